//! The device has one owner: a named OS thread that owns the `Pipeline` and renders one batch at a
//! time, fed through a bounded channel. Async code never calls into candle; it sends a
//! [`RenderRequest`] and awaits the reply, so the tokio runtime never blocks on the GPU.

use std::ops::ControlFlow;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::{Pipeline, PipelineError, RenderBatch, Rendered, StepProgress};

/// Called after every denoising step, on the runner thread; may stop the batch.
pub type StepHook = Box<dyn FnMut(&StepProgress<'_>) -> ControlFlow<()> + Send>;

pub struct RenderRequest {
    pub batch: RenderBatch,
    pub on_step: StepHook,
    pub reply: oneshot::Sender<Result<Rendered, PipelineError>>,
}

/// Handle to the render thread. Cloning shares the thread.
#[derive(Clone)]
pub struct Runner {
    tx: mpsc::Sender<RenderRequest>,
}

#[derive(Debug, thiserror::Error)]
#[error("the render thread has stopped")]
pub struct RunnerGone;

impl Runner {
    /// Starts the thread; it exits when every `Runner` handle is dropped.
    pub fn spawn(pipeline: Pipeline) -> std::io::Result<(Self, JoinHandle<()>)> {
        // One batch queued while one renders: the scheduler forms the next batch while the device works.
        let (tx, mut rx) = mpsc::channel::<RenderRequest>(1);
        let handle = std::thread::Builder::new()
            .name("t2i-render".into())
            .spawn(move || {
                while let Some(mut req) = rx.blocking_recv() {
                    let result = pipeline.render(&req.batch, &mut |s| (req.on_step)(&s));
                    // The requester may have gone away (shutdown); nothing to do then.
                    let _ = req.reply.send(result);
                }
            })?;
        Ok((Self { tx }, handle))
    }

    pub async fn render(
        &self,
        batch: RenderBatch,
        on_step: StepHook,
    ) -> Result<Result<Rendered, PipelineError>, RunnerGone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(RenderRequest {
                batch,
                on_step,
                reply,
            })
            .await
            .map_err(|_| RunnerGone)?;
        rx.await.map_err(|_| RunnerGone)
    }
}
