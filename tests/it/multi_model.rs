//! One worker serving two models within a memory budget (`--models`, `--memory-budget`), on the
//! real broker and Garage: with a budget that holds one model at a time, jobs alternating between
//! `ssd-1b-tiny` and `sd15-tiny` all succeed, each rendered by its own model (the event's `model`,
//! its defaults, its pixels against an in-process render), and the least recently used model is
//! unloaded each time (`t2i_model_unloads_total`); a model whose weights alone exceed the budget
//! fails its jobs with `model_unavailable` once measured, without loading again, while the other
//! model keeps serving.

use std::ops::ControlFlow;
use std::time::Duration;

use candle_core::DType;
use serde_json::json;
use t2i_worker::events::{CloudEvent, ErrorCode};
use t2i_worker::job::{Job, Limits};
use t2i_worker::pipeline::{ImageSpec, Pipeline, RenderBatch, Variant};
use t2i_worker::queue::{Delivered, Lane, Route};

use crate::broker::{WorkerProc, World, get_object, s3, serial};
use crate::support::{load_pipeline, model_dir};

const SSD: &str = "ssd-1b-tiny";
const SD: &str = "sd15-tiny";

fn body(id: &str, model: &str) -> Vec<u8> {
    json!({"job_id": id, "prompt": format!("a lighthouse, job {id}"), "model": model,
           "width": 32, "height": 32, "steps": 1, "seed": 5})
    .to_string()
    .into_bytes()
}

/// Publishes a job for `model` on its pool's key and waits for its terminal event.
async fn run_one(world: &mut World, w: &WorkerProc, id: &str, model: &str) -> CloudEvent {
    let route = Route::of(Lane::Interactive, Some(model)).unwrap();
    let sent = world
        .publisher
        .job(&route, id, &body(id, model), None)
        .await;
    assert_eq!(sent.unwrap(), Delivered::Routed, "{id}");
    let done = |seen: &[CloudEvent]| {
        seen.iter().any(|e| {
            e.subject == id && (e.kind.ends_with(".succeeded") || e.kind.ends_with(".failed"))
        })
    };
    let ended = world.collect_until(Duration::from_secs(120), done).await;
    assert!(ended, "{id} did not end\n{}", w.log_tail(30));
    world.terminal()[id][0].clone()
}

/// A sample of the worker's metrics: `name{model="slug"}`.
fn metric(w: &WorkerProc, name: &str, slug: &str) -> f64 {
    let (status, text) = w.http_get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    let prefix = format!("t2i_{name}{{model=\"{slug}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{prefix} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The pixels `p` renders for the job `e` ran: the job parsed with the model's defaults.
fn render_alone(p: &Pipeline, e: &CloudEvent) -> Vec<u8> {
    let params = e.data.params.clone().expect("params");
    let id = e.subject.as_str();
    let model = params["model"].as_str().unwrap();
    let job = Job::parse(
        serde_json::from_slice(&body(id, model)).unwrap(),
        &Limits {
            min_side: 32,
            ..Limits::default()
        },
        &p.model_defaults(),
    )
    .unwrap();
    let g = &job.generation;
    let batch = RenderBatch::new(g, ImageSpec::all_of(g));
    let rendered = p
        .render(&batch, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    rendered.images[0].as_raw().clone()
}

async fn stored_pixels(client: &aws_sdk_s3::Client, e: &CloudEvent) -> Vec<u8> {
    let key = &e.data.images[0].key;
    let (png, _, _) = get_object(client, key).await.expect("stored image");
    image::load_from_memory(&png).unwrap().to_rgb8().into_raw()
}

fn models_flag(first: &str, second: &str) -> String {
    let dir = |m: &str| model_dir(m).to_str().unwrap().to_string();
    format!("{},{}", dir(first), dir(second))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_alternates_two_models_within_a_budget_that_holds_one() {
    let _g = serial().await;
    let mut world = World::new("models").await;
    let pipelines = [SSD, SD].map(|m| load_pipeline(m, DType::F32, Variant::Auto));
    let sizes = pipelines.each_ref().map(|p| p.loaded_bytes());
    // Either fits alone; both do not.
    let budget = sizes[0].max(sizes[1]);
    assert!(
        sizes[0] + sizes[1] > budget && sizes.iter().all(|&s| s > 0),
        "{sizes:?}"
    );
    let models = models_flag(SSD, SD);
    let budget_flag = budget.to_string();
    let w = WorkerProc::spawn(
        &world,
        "w-two",
        &["--models", &models, "--memory-budget", &budget_flag],
    );
    assert_eq!(
        metric(&w, "model_loaded", SSD),
        1.0,
        "the first model is warm"
    );
    assert_eq!(metric(&w, "model_loaded", SD), 0.0);

    let client = s3().await;
    let order = [SD, SSD, SD, SSD, SD, SSD];
    for (i, model) in order.into_iter().enumerate() {
        let id = format!("alt-{i}");
        let e = run_one(&mut world, &w, &id, model).await;
        assert_eq!(e.kind, "t2i.job.succeeded", "{id}: {:?}", e.data.error);
        assert!(e.data.model.ends_with(model), "{id}: {}", e.data.model);
        // Rendered by its own model, with its own defaults (SD 1.5: PNDM, guidance 7.5).
        let p = &pipelines[usize::from(model == SD)];
        let params = e.data.params.as_ref().unwrap();
        let defaults = p.model_defaults();
        assert_eq!(params["scheduler"], defaults.scheduler.as_str(), "{id}");
        assert_eq!(params["guidance_scale"], defaults.guidance_scale, "{id}");
        assert_eq!(
            stored_pixels(&client, &e).await,
            render_alone(p, &e),
            "{id}: the image is {model}'s"
        );
        // Exactly one model on the device after each job: the one that just rendered.
        assert_eq!(metric(&w, "model_loaded", model), 1.0, "{id}");
        let other = if model == SD { SSD } else { SD };
        assert_eq!(metric(&w, "model_loaded", other), 0.0, "{id}");
    }
    // Each of the six switches unloaded the model used before it, three times each; SSD-1B was
    // also loaded at start.
    assert_eq!(metric(&w, "model_unloads_total", SSD), 3.0);
    assert_eq!(metric(&w, "model_unloads_total", SD), 3.0);
    assert_eq!(metric(&w, "model_loads_total", SSD), 4.0);
    assert_eq!(metric(&w, "model_loads_total", SD), 3.0);
    assert_eq!(
        metric(&w, "model_weight_bytes", SD),
        sizes[1] as f64,
        "measured by its loaded tensors"
    );
    assert!(
        w.log_tail(400).contains("model unloaded"),
        "{}",
        w.log_tail(40)
    );
    drop(w);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_larger_than_the_budget_fails_its_jobs_and_is_not_loaded_again() {
    let _g = serial().await;
    let mut world = World::new("toolarge").await;
    let sizes = [SSD, SD].map(|m| load_pipeline(m, DType::F32, Variant::Auto).loaded_bytes());
    // The smaller model first (it must fit to start); the budget holds it and not the larger.
    let (small, large) = if sizes[0] <= sizes[1] {
        (SSD, SD)
    } else {
        (SD, SSD)
    };
    let budget = sizes[0].min(sizes[1]);
    assert!(sizes[0] != sizes[1], "{sizes:?}");
    let models = models_flag(small, large);
    let budget_flag = budget.to_string();
    let w = WorkerProc::spawn(
        &world,
        "w-budget",
        &["--models", &models, "--memory-budget", &budget_flag],
    );
    for (id, model) in [("big-0", large), ("small-0", small), ("big-1", large)] {
        let e = run_one(&mut world, &w, id, model).await;
        if model == large {
            assert_eq!(e.kind, "t2i.job.failed", "{id}");
            let error = e.data.error.as_ref().unwrap();
            assert_eq!(error.code, ErrorCode::ModelUnavailable, "{id}");
            assert!(
                error.message.contains("memory budget") && error.message.contains(large),
                "{id}: {}",
                error.message
            );
        } else {
            assert_eq!(e.kind, "t2i.job.succeeded", "{id}: {:?}", e.data.error);
        }
    }
    // The large model's first load (its size unknown) made room by unloading the small one; once
    // measured it is refused without loading, and the small one serves on.
    assert_eq!(metric(&w, "model_loads_total", large), 1.0);
    assert_eq!(metric(&w, "model_loaded", large), 0.0);
    assert_eq!(metric(&w, "model_loaded", small), 1.0);
    drop(w);
    world.cleanup().await;
}
