#!/usr/bin/env python3
"""Bulk at scale, without rendering: how fast and how small `t2i enqueue` and `t2i batch` are on
batches of a million jobs and of 100,000 stored results, against the real RabbitMQ and Garage.

    eval "$(scripts/test.sh --setup-only)"          # RabbitMQ, Garage and their variables
    python3 -m venv ~/.cache/t2i-worker/venv-bench
    ~/.cache/t2i-worker/venv-bench/bin/pip install -r scripts/bench/requirements-bulk.txt
    ~/.cache/t2i-worker/venv-bench/bin/python scripts/bench/bulk_scale.py --t2i target/release/t2i

Each figure is one process, measured from outside (wall clock; peak RSS and CPU time from GNU time):

1. publish: `t2i enqueue --template` over 1000 x 1000 values = 1,000,000 jobs, each checked with the
   workers' parser, published with confirms (no worker runs: the jobs stay queued, then the test
   queues are deleted). Targets: >= 20,000 jobs/s published, <= 300 MiB peak RSS.
2. status: `t2i batch status` of a batch of --results stored results (default 100,000), which this
   script PUTs into Garage directly (boto3, 64 threads): per job a `result.json` of the size a worker
   writes, a `status.json` and a placeholder `0.png` (three keys per job, as a real batch lists),
   plus `batch.json`. Target: <= 30 s.
3. manifest: `t2i batch manifest --manifest` of that batch and of one a tenth its size: the peak RSS
   of both, to show memory does not grow with the batch.
4. watch: `t2i batch watch` of a batch of --events jobs (default 100,000) with no stored results, fed
   that many `job.succeeded` events published straight to the events exchange (pika): peak RSS and
   CPU time until it has counted them all.

The objects and queues live under a fresh prefix (`bench-<time>`), removed at the end unless --keep.
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

MIB = 1024 * 1024


RUSAGE = "t2i-bench-rusage"


def measured(cmd, env):
    """Runs `cmd`; returns (wall s, peak RSS MiB, CPU s, stdout, stderr). The peak RSS and CPU time
    come from GNU time (/usr/bin/time), which forks from its own small process: a child forked from
    this Python would count this interpreter's pages in its peak RSS until it execs."""
    print("$ " + " ".join(cmd if len(" ".join(cmd)) < 300 else cmd[:3] + ["..."]), file=sys.stderr, flush=True)
    start = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-f", f"{RUSAGE} %M %U %S", *cmd], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - start
    if p.returncode != 0:
        sys.exit(f"{cmd[1]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    lines = p.stderr.splitlines()
    usage = next(l for l in reversed(lines) if l.startswith(RUSAGE)).split()
    stderr = "\n".join(l for l in lines if not l.startswith(RUSAGE))
    # %M is in KiB.
    return wall, int(usage[1]) / 1024, float(usage[2]) + float(usage[3]), p.stdout, stderr


def result_record(bucket, key_prefix, batch, i, total):
    """A result.json as a worker writes it for a one-image 512² job (the same fields and sizes)."""
    job = f"{batch}-{i:07d}"
    return json.dumps({
        "job_id": job, "status": "succeeded", "attempt": 1, "worker": "bench-worker-1",
        "model": "segmind/SSD-1B",
        "params": {"job_id": job, "prompt": f"a photo of item {i} in the style of a painter", "negative_prompt": None,
                   "width": 512, "height": 512, "steps": 4, "guidance_scale": 5.0, "scheduler": "euler",
                   "seed": 1_000_000 + i, "seed_was_random": False, "num_images": 1, "model": None,
                   "output": {"format": "png", "quality": 90, "key_prefix": key_prefix, "presign_ttl_s": 3600},
                   "webhook": None, "batch": {"id": batch, "index": i, "total": total}, "deadline": None,
                   "metadata": {"template_vars": {"i": str(i)}}},
        "images": [{"index": 0, "seed": 1_000_000 + i, "bucket": bucket, "key": f"{key_prefix}{job}/0.png",
                    "url": None, "url_expires_at": None, "content_type": "image/png", "width": 512,
                    "height": 512, "bytes": 412345, "sha256": f"{i:064x}"}],
        "timings_ms": {"queued": 12, "inference": 2100, "encode": 30, "upload": 20, "total": 2170},
        "error": None, "prompt_truncated": False, "batch": {"id": batch, "index": i, "total": total},
        "metadata": {"template_vars": {"i": str(i)}}, "updated_at": "2026-12-01T00:00:00Z",
    }, indent=2).encode()


def batch_record(batch, key_prefix, total):
    now = "2026-12-01T00:00:00Z"
    return json.dumps({"batch_id": batch, "key_prefix": key_prefix, "total": total, "published": total,
                       "lane": "bulk", "created_at": now, "updated_at": now}).encode()


def seed_results(s3, bucket, store_prefix, batch, n, objects_per_job):
    """PUTs n jobs' objects (result.json, then status.json and a placeholder 0.png as
    objects_per_job asks) and batch.json; returns the seconds it took."""
    key_prefix = f"datasets/{batch}/"
    start = time.monotonic()
    s3.put_object(Bucket=bucket, Key=f"{store_prefix}{key_prefix}batch.json",
                  Body=batch_record(batch, key_prefix, n))

    def put(i):
        job = f"{store_prefix}{key_prefix}{batch}-{i:07d}"
        s3.put_object(Bucket=bucket, Key=f"{job}/result.json",
                      Body=result_record(bucket, f"{store_prefix}{key_prefix}", batch, i, n),
                      ContentType="application/json")
        # A real job's folder also holds its running record and its image: as many keys to list.
        if objects_per_job >= 2:
            s3.put_object(Bucket=bucket, Key=f"{job}/status.json", Body=b"{}")
        if objects_per_job >= 3:
            s3.put_object(Bucket=bucket, Key=f"{job}/0.png", Body=b"\x89PNG")

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        for _ in pool.map(put, range(n), chunksize=256):
            pass
    return time.monotonic() - start


def delete_prefix(s3, bucket, prefix):
    paginator = s3.get_paginator("list_objects_v2")
    keys = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys += [{"Key": o["Key"]} for o in page.get("Contents", [])]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda c: s3.delete_objects(Bucket=bucket, Delete={"Objects": c, "Quiet": True}),
                      [keys[i:i + 1000] for i in range(0, len(keys), 1000)]))


def delete_queues(prefix):
    names = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], check=True, text=True,
                           stdout=subprocess.PIPE).stdout.split()
    for q in names:
        if q.startswith(prefix + "."):
            subprocess.run(["rabbitmqctl", "-q", "delete_queue", q], check=False, stdout=subprocess.DEVNULL)


def publish_events(amqp_url, exchange, batch, n):
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    for i in range(n):
        job = f"{batch}-{i:07d}"
        event = {"specversion": "1.0", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, job)),
                 "source": "/t2i-worker/bench", "type": "t2i.job.succeeded", "subject": job,
                 "time": "2026-12-01T00:00:00Z", "datacontenttype": "application/json",
                 "data": {"job_id": job, "status": "succeeded", "attempt": 1, "worker": "bench",
                          "model": "segmind/SSD-1B", "params": None, "images": [], "timings_ms": None,
                          "error": None, "prompt_truncated": False,
                          "batch": {"id": batch, "index": i, "total": n}, "metadata": None}}
        ch.basic_publish(exchange, "job.succeeded", json.dumps(event).encode())
    conn.close()


def bound(exchange):
    out = subprocess.run(["rabbitmqctl", "-q", "list_bindings", "source_name", "routing_key"], text=True,
                         stdout=subprocess.PIPE).stdout
    return any(l.split("\t")[0] == exchange and "job.succeeded" in l for l in out.splitlines())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t2i", default="target/release/t2i")
    ap.add_argument("--jobs", type=int, default=1_000_000, help="jobs to publish (a square number)")
    ap.add_argument("--results", type=int, default=100_000, help="stored results for status and manifest")
    ap.add_argument("--events", type=int, default=100_000, help="events for watch")
    ap.add_argument("--objects-per-job", type=int, default=3, choices=[1, 2, 3],
                    help="objects seeded per job: result.json, + status.json, + an image (as a real batch)")
    ap.add_argument("--keep", action="store_true", help="keep the objects and queues")
    ap.add_argument("--skip-publish", action="store_true", help="only the store and watch figures")
    args = ap.parse_args()
    import boto3
    from botocore.config import Config

    bucket = os.environ["T2I_TEST_BUCKET"]
    amqp = os.environ.get("T2I_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    prefix = f"bench-{int(time.time())}"
    store_prefix = f"{prefix}/"
    storage = f"s3://{bucket}/{store_prefix}"
    env = dict(os.environ, T2I_LOG="warn")
    common = ["--amqp-url", amqp, "--amqp-prefix", prefix, "--storage", storage]
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                      config=Config(s3={"addressing_style": "path"}, max_pool_connections=64))
    rows = []
    try:
        # 1. Publish a million templated jobs.
        if not args.skip_publish:
            side = int(round(args.jobs ** 0.5))
            values = ",".join(str(v) for v in range(side))
            wall, rss, cpu, _, err = measured(
                [args.t2i, "enqueue", *common, "--template", "item {a} of {b}", "--var", f"a={values}",
                 "--var", f"b={values}", "--steps", "4", "--width", "512", "--height", "512", "--quiet",
                 "--batch-id", "scale-publish"], env)
            line = next(l for l in err.splitlines() if "published" in l)
            rate = float(line.split(" jobs/s")[0].rsplit("(", 1)[1])
            n = side * side
            rows.append((f"publish {n:,} jobs (checked, confirmed)", f"{rate:,.0f} jobs/s published; whole "
                         f"process {wall:.1f} s = {n / wall:,.0f} jobs/s", ">= 20,000 jobs/s", rate >= 20_000))
            rows.append((f"publish {n:,} jobs: peak RSS", f"{rss:,.0f} MiB (CPU {cpu:.1f} s)", "<= 300 MiB",
                         rss <= 300))
            delete_queues(prefix)

        # 2. Status of stored results, 3. manifests of two sizes.
        small = max(args.results // 10, 1)
        per = args.objects_per_job
        secs = seed_results(s3, bucket, store_prefix, "scale-big", args.results, per)
        print(f"seeded {args.results:,} jobs x {per} objects in {secs:.1f} s "
              f"({args.results * per / secs:,.0f} PUT/s)", file=sys.stderr)
        seed_results(s3, bucket, store_prefix, "scale-small", small, per)
        wall, rss, cpu, out, _ = measured([args.t2i, "batch", "status", "scale-big", "--json", "--storage", storage], env)
        counts = json.loads(out)["counts"]
        assert counts["done"] == args.results, counts
        rows.append((f"status of {args.results:,} stored results ({args.results * per:,} objects)",
                     f"{wall:.1f} s, {rss:,.0f} MiB (CPU {cpu:.1f} s)",
                     "<= 30 s", wall <= 30))
        with tempfile.TemporaryDirectory() as d:
            figures = {}
            for batch, n in [("scale-small", small), ("scale-big", args.results)]:
                wall, rss, cpu, _, _ = measured(
                    [args.t2i, "batch", "manifest", batch, "--storage", storage, "--manifest", f"{d}/{batch}"], env)
                lines = sum(1 for _ in open(f"{d}/{batch}/metadata.jsonl"))
                assert lines == n, (batch, lines, n)
                figures[n] = rss
                rows.append((f"manifest of {n:,} results", f"{wall:.1f} s, {rss:,.0f} MiB (CPU {cpu:.1f} s)", "", None))
            ratio = figures[args.results] / figures[small]
            rows.append(("manifest memory, 10x the batch", f"{ratio:.2f}x the peak RSS", "independent of size",
                         ratio <= 1.25))

        # 4. Watch a batch fed by events.
        s3.put_object(Bucket=bucket, Key=f"{store_prefix}datasets/scale-watch/batch.json",
                      Body=batch_record("scale-watch", "datasets/scale-watch/", args.events))
        result = {}

        def watch():
            result["m"] = measured([args.t2i, "batch", "watch", "scale-watch", *common, "--quiet",
                                    "--wait-timeout-s", "600"], env)

        t = threading.Thread(target=watch)
        t.start()
        deadline = time.monotonic() + 60
        while not bound(f"{prefix}.events"):
            assert time.monotonic() < deadline, "watch never subscribed"
            time.sleep(0.5)
        start = time.monotonic()
        publish_events(amqp, f"{prefix}.events", "scale-watch", args.events)
        published = time.monotonic() - start
        t.join()
        wall, rss, cpu, _, err = result["m"]
        assert f"{args.events} job(s) ended" in err, err
        rows.append((f"watch {args.events:,} events", f"{rss:,.0f} MiB peak RSS, CPU {cpu:.1f} s "
                     f"({args.events / max(cpu, 1e-9):,.0f} events per CPU-second; published in {published:.1f} s)",
                     "", None))
    finally:
        if not args.keep:
            delete_queues(prefix)
            delete_prefix(s3, bucket, store_prefix)
    width = max(len(r[0]) for r in rows)
    print()
    for what, got, target, ok in rows:
        mark = "" if ok is None else ("  ok" if ok else "  MISSED")
        print(f"{what:<{width}}  {got}" + (f"  [target {target}]{mark}" if target else ""))


if __name__ == "__main__":
    main()
