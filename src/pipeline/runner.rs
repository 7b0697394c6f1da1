//! The device has one owner: a named OS thread that owns the pipelines ([`Pipelines`]: one, or a
//! worker's several models loaded on demand) and renders one batch at a time, fed through a
//! bounded channel. Async code never calls into candle; it sends a [`RenderRequest`] and awaits
//! the reply, so the tokio runtime never blocks on the GPU. A model is loaded or unloaded only
//! here, between two batches, so no batch ever has its model taken away.

use std::ops::ControlFlow;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::{Pipeline, PipelineError, RenderBatch, Rendered, StepProgress};

/// Called after every denoising step, on the runner thread; may stop the batch.
pub type StepHook = Box<dyn FnMut(&StepProgress<'_>) -> ControlFlow<()> + Send>;

/// What the render thread renders with: the pipeline of a served model, by its index.
pub trait Pipelines: Send + 'static {
    /// Model `model`'s pipeline, loaded (and others unloaded) as needed.
    ///
    /// # Errors
    /// The model cannot be loaded or served ([`PipelineError::ModelUnavailable`]).
    fn pipeline(&mut self, model: usize) -> Result<&Pipeline, PipelineError>;
}

/// One model: every request renders with it.
impl Pipelines for Pipeline {
    fn pipeline(&mut self, _model: usize) -> Result<&Pipeline, PipelineError> {
        Ok(self)
    }
}

pub struct RenderRequest {
    /// Which served model renders the batch.
    pub model: usize,
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
    pub fn spawn(mut pipelines: impl Pipelines) -> std::io::Result<(Self, JoinHandle<()>)> {
        // One batch queued while one renders: the scheduler forms the next batch while the device works.
        let (tx, mut rx) = mpsc::channel::<RenderRequest>(1);
        let handle = std::thread::Builder::new()
            .name("t2i-render".into())
            .spawn(move || {
                while let Some(mut req) = rx.blocking_recv() {
                    let result = pipelines
                        .pipeline(req.model)
                        .and_then(|p| p.render(&req.batch, &mut |s| (req.on_step)(&s)));
                    // The requester may have gone away (shutdown); nothing to do then.
                    let _ = req.reply.send(result);
                }
            })?;
        Ok((Self { tx }, handle))
    }

    pub async fn render(
        &self,
        model: usize,
        batch: RenderBatch,
        on_step: StepHook,
    ) -> Result<Result<Rendered, PipelineError>, RunnerGone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(RenderRequest {
                model,
                batch,
                on_step,
                reply,
            })
            .await
            .map_err(|_| RunnerGone)?;
        rx.await.map_err(|_| RunnerGone)
    }
}
