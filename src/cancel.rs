//! `t2i cancel <job-id>... | --batch <id>`: one [`ControlMessage`] on `t2i.control` (fanout),
//! confirmed by the broker. Every running worker drops the matching jobs it holds or receives later
//! (until it restarts) with `job.canceled`, and stops a matching batch on the device between
//! denoising steps.

use anyhow::{Context, Result};

use crate::cli::{CancelArgs, UsageError};
use crate::control::ControlMessage;
use crate::queue::{Connection, Delivered};

pub async fn run(args: CancelArgs) -> Result<()> {
    let message = ControlMessage {
        cancel_jobs: args.job_ids,
        cancel_batches: args.batches,
    };
    if message.is_empty() {
        return Err(UsageError("nothing to cancel: give job ids or --batch <id>".into()).into());
    }
    // The workers' own bounds: a message they would refuse is not sent.
    if let Err(e) = message.check() {
        return Err(UsageError(e.to_string()).into());
    }
    let topology = crate::config::topology(&args.broker)?;
    let conn = Connection::open(&args.broker.amqp_url, "t2i cancel")
        .await
        .context("connecting to RabbitMQ")?;
    // Only the control exchange: cancel works whatever the workers' other settings are.
    conn.declare_control(&topology)
        .await
        .context("declaring the control exchange")?;
    let delivered = conn
        .publisher(&topology)
        .await?
        .control(&message.to_json())
        .await?;
    conn.close("done").await;
    match delivered {
        Delivered::Routed => println!(
            "canceled {} job(s), {} batch(es): delivered to the running workers",
            message.cancel_jobs.len(),
            message.cancel_batches.len()
        ),
        Delivered::Unroutable => {
            anyhow::bail!("no worker is running: nothing was canceled")
        }
    }
    Ok(())
}
