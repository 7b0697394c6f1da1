//! `t2i cancel <job-id>... | --batch <id>`: one control message on `t2i.control` (fanout), confirmed by
//! the broker. Every running worker drops the matching jobs it holds or receives later (until it
//! restarts) with `job.canceled`, and stops a matching batch on the device between denoising steps.

use anyhow::{Context, Result};

use crate::cli::{CancelArgs, UsageError};
use crate::queue::{Publisher, publisher::Delivered};

pub fn run(args: CancelArgs) -> Result<()> {
    if args.job_ids.is_empty() && args.batches.is_empty() {
        return Err(UsageError("nothing to cancel: give job ids or --batch <id>".into()).into());
    }
    if let Some(bad) = args
        .job_ids
        .iter()
        .chain(&args.batches)
        .find(|id| id.is_empty() || id.len() > 128)
    {
        return Err(UsageError(format!("invalid id `{bad}` (1 to 128 characters)")).into());
    }
    let topology = crate::config::topology(&args.broker)?;
    let body = serde_json::json!({
        "cancel_jobs": args.job_ids,
        "cancel_batches": args.batches,
    })
    .to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let delivered = runtime.block_on(async {
        let conn = crate::queue::connect(&args.broker.amqp_url, "t2i cancel")
            .await
            .context("connecting to RabbitMQ")?;
        // Only the control exchange: cancel works whatever the workers' other settings are.
        let ch = conn.create_channel().await?;
        ch.exchange_declare(
            topology.control_exchange().as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .context("declaring the control exchange")?;
        let publisher = Publisher::open(&conn, &topology).await?;
        let delivered = publisher.control(body.as_bytes()).await?;
        let _ = conn.close(0, "done".into()).await;
        anyhow::Ok(delivered)
    })?;
    match delivered {
        Delivered::Routed => println!(
            "canceled {} job(s), {} batch(es): delivered to the running workers",
            args.job_ids.len(),
            args.batches.len()
        ),
        Delivered::Unroutable => {
            anyhow::bail!("no worker is running: nothing was canceled")
        }
    }
    Ok(())
}
