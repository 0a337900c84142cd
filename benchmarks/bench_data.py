"""Host data pipeline figures: ``python -m benchmarks.bench_data PART``.

  python -m benchmarks.bench_data throughput [--smoke]
  python -m benchmarks.bench_data epoch [--dir /tmp/jaxdef_bench_data] [--gib 4.05] [--keep]

(from the repository root; ``benchmarks`` is not part of the installed package).

* ``throughput``: images per second of the host side of
  :class:`jaxdef.data.streamed.TrainData`, per core (one process computing
  :class:`~jaxdef.data.streamed.LocalBatches` step after step) and end to end
  (``TrainData.batches``: Grain and the device arrays, with 0 and 2 worker
  processes), for 32x32x3 images held in memory or read from raw ArrayRecord
  records (batch 512, crop and flip left to the device), and for 500x375
  JPEGs decoded and random-resized-cropped to 224 px with a flip on the host
  (batch 64).
* ``epoch``: writes a generated training set of at least ``--gib`` GiB of raw
  32x32x3 records (about 1.4M images for 4 GiB) and a small real set
  (3,000 images), then trains the small CNN (PGD-2) one epoch streamed with
  70% of every batch drawn from the large set (``data.extra``; one epoch is
  the real set / 0.3), in a ``python -m jaxdef train`` subprocess with one
  Grain worker. The run is stopped by SIGTERM halfway (a checkpoint) and
  resumed to the end of the epoch. Printed: peak host memory of the process
  tree (the trainer and its workers: RSS of the trainer, the sum of RSS and
  the sum of unique set sizes over the tree, sampled every 0.5 s), the time
  from start to the first step of the fresh run and of the resumed one
  (mid-epoch), and the data side of the resume alone (opening the sources
  and making the first batch at the resume step). The generated folders are
  deleted afterwards unless ``--keep``.

Each figure is one JSON line. Nothing passes or fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# Generated datasets, written by the importer's own writer.

def write_generated(dest: Path, splits: dict[str, tuple[int, Callable[[int, int], tuple]]],
                    *, num_classes: int, encoding: str, image_shape, channels: int,
                    shards: int) -> None:
  """Writes an imported-dataset folder whose split ``name`` holds ``count``
  examples made ``chunk`` at a time by ``make(start, stop) -> (images, labels)``
  (``splits = {name: (count, make)}``); ``encoding`` 'raw' or 'jpeg' (then the
  images are JPEG bytes, decoded here only for the mean/std)."""
  from jaxdef.data import importer, records

  def chunks(count: int, make) -> Callable[[], Iterator[importer.Chunk]]:
    def gen():
      for start in range(0, count, 8192):
        images, labels = make(start, min(count, start + 8192))
        # The mean/std from a sample of each chunk (they do not change the timings).
        sample = images[:64]
        pixels = np.stack(sample if encoding == "raw" else
                          [records.decode_image(im, channels) for im in sample])
        yield importer.Chunk([records.encode_record(im, int(y), encoding=encoding)
                              for im, y in zip(images, labels)],
                             [int(y) for y in labels], pixels, [], len(labels))
    return gen

  plan = importer.Plan(format="generated", path=str(dest),
                       class_names=tuple(str(i) for i in range(num_classes)),
                       image_shape=image_shape, channels=channels, encoding=encoding,
                       splits={name: importer.SplitSource(count, 1.0, chunks(count, make))
                               for name, (count, make) in splits.items()})
  dest.mkdir(parents=True, exist_ok=True)
  meta = importer.write_plan(plan, str(dest), shards, progress=False)
  records.write_metadata(str(dest), meta)


def random_raw(seed: int, shape=(32, 32, 3), num_classes: int = 10):
  """``make(start, stop)`` of random uint8 images (incompressible: the bytes on
  disk are the pixels) and labels, a pure function of (seed, start)."""
  def make(start: int, stop: int):
    rng = np.random.default_rng([seed, start])
    return (rng.integers(0, 256, (stop - start,) + tuple(shape), dtype=np.uint8),
            rng.integers(0, num_classes, stop - start))
  return make


def photo_jpegs(seed: int, size=(375, 500), num_classes: int = 10, quality: int = 90):
  """``make(start, stop)`` of JPEG bytes of photo-like images (smooth colour
  fields plus fine texture; about ImageNet's typical size and bytes)."""
  from PIL import Image

  def make(start: int, stop: int):
    rng = np.random.default_rng([seed, start])
    out = []
    for _ in range(stop - start):
      coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
      smooth = np.asarray(Image.fromarray(coarse).resize(size[::-1], Image.Resampling.BICUBIC))
      texture = rng.normal(0, 10, smooth.shape)
      pixels = np.clip(smooth + texture, 0, 255).astype(np.uint8)
      buffer = io.BytesIO()
      Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
      out.append(buffer.getvalue())
    return out, rng.integers(0, num_classes, stop - start)
  return make


def data_config(path: str, **fields):
  import ml_collections
  return ml_collections.ConfigDict({
      "name": "arrayrecord", "path": path, "augment": "crop_flip", "max_train": 0,
      "max_test": 0, "val_size": 0, "streamed": None, "workers": 0, "image_size": 0,
      "extra": {"path": ""}, "extra_fraction": 0.0, "extra_label_smoothing": 0.0, **fields})


# ----------------------------------------------------------------------------
# throughput

def per_core(local, steps: Sequence[int], batch: int) -> float:
  """Images/s of one process computing the local batches of ``steps`` (one warm-up)."""
  local(steps[0])
  t0 = time.perf_counter()
  for s in steps[1:]:
    local(s)
  return batch * (len(steps) - 1) / (time.perf_counter() - t0)


def end_to_end(data, steps: int, sharding, batch: int) -> float:
  """Images/s of ``data.batches`` (device arrays out), after one batch from each
  worker (their start-up is not counted)."""
  import jax
  warm = max(1, data.workers)
  batches = data.batches(0, steps + warm, sharding)
  for _ in range(warm):
    jax.block_until_ready(next(batches))
  t0 = time.perf_counter()
  for x in batches:
    jax.block_until_ready(x)
  seconds = time.perf_counter() - t0
  batches.close()
  return batch * steps / seconds


def throughput(smoke: bool, workdir: Path) -> list[dict[str, Any]]:
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from jaxdef.data.streamed import ArrayRows, train_data
  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)),
                           PartitionSpec("data"))
  out = []
  # 32 px: raw records vs the same images in memory.
  n32, batch32, steps32 = (256, 32, 4) if smoke else (20000, 512, 20)
  small = workdir / "raw32"
  write_generated(small, {"train": (n32, random_raw(0)), "test": (64, random_raw(1))},
                  num_classes=10, encoding="raw", image_shape=(32, 32, 3), channels=3, shards=4)
  streamed, _ = train_data(data_config(str(small)), seed=0, global_batch=batch32)
  chunks = [random_raw(0)(s, min(n32, s + 8192)) for s in range(0, n32, 8192)]
  in_memory = ArrayRows(np.concatenate([c[0] for c in chunks]),
                        np.concatenate([c[1] for c in chunks]).astype(np.int32))
  local_streamed = streamed.local_batches(sharding)
  local_memory = dataclasses.replace(local_streamed, sources=(in_memory,))
  steps = list(range(steps32 + 1))
  for path, local in (("in memory", local_memory), ("streamed", local_streamed)):
    out.append({"case": "32px raw", "path": path, "batch": batch32, "what": "per core",
                "images_per_s": per_core(local, steps, batch32)})
  for workers in (0, 2):
    data, _ = train_data(data_config(str(small), workers=workers), seed=0,
                         global_batch=batch32)
    out.append({"case": "32px raw", "path": "streamed", "batch": batch32,
                "what": f"end to end, {workers} workers",
                "images_per_s": end_to_end(data, steps32, sharding, batch32)})
  # 224 px: JPEGs decoded at their stored size, random-resized-crop + flip.
  n224, batch224, steps224 = (32, 8, 2) if smoke else (1024, 64, 8)
  jpegs = workdir / "jpeg"
  write_generated(jpegs, {"train": (n224, photo_jpegs(0)), "test": (16, photo_jpegs(1))},
                  num_classes=10, encoding="jpeg", image_shape=(375, 500, 3), channels=3,
                  shards=2)
  sizes = [os.path.getsize(jpegs / f) for f in meta_files(jpegs, "train")]
  crop = dict(augment="rrc_flip", image_size=224)
  data, _ = train_data(data_config(str(jpegs), **crop), seed=0, global_batch=batch224)
  out.append({"case": "224px jpeg rrc_flip", "path": "streamed", "batch": batch224,
              "what": "per core", "jpeg_kib": sum(sizes) / n224 / 1024,
              "images_per_s": per_core(data.local_batches(sharding),
                                       list(range(steps224 + 1)), batch224)})
  for workers in (0, 2):
    data, _ = train_data(data_config(str(jpegs), workers=workers, **crop), seed=0,
                         global_batch=batch224)
    out.append({"case": "224px jpeg rrc_flip", "path": "streamed", "batch": batch224,
                "what": f"end to end, {workers} workers",
                "images_per_s": end_to_end(data, steps224, sharding, batch224)})
  return out


def meta_files(folder: Path, split: str) -> list[str]:
  from jaxdef.data import records
  return list(records.read_metadata(str(folder)).splits[split].files)


# ----------------------------------------------------------------------------
# epoch: peak memory and resume cost on a set larger than 4 GiB

def tree_memory(pid: int) -> Optional[tuple[int, int, int]]:
  """(trainer RSS, sum of RSS, sum of USS) in bytes over ``pid`` and its children."""
  import psutil
  try:
    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
  except psutil.NoSuchProcess:
    return None
  rss = uss = main = 0
  for p in procs:
    try:
      info = p.memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
      continue
    rss, uss = rss + info.rss, uss + info.uss
    main = info.rss if p.pid == pid else main
  return main, rss, uss


def train_steps(workdir: Path) -> list[int]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line being written
    if rec.get("split") == "train" and "loss" in rec:
      steps.append(int(rec["step"]))
  return steps


def watch(command: Sequence[str], workdir: Path, after: int, stop_at: Optional[int],
          log: Path) -> dict[str, Any]:
  """Runs ``command``; seconds to the first train record past step ``after``,
  the peak memory of its process tree, and SIGTERM once step ``stop_at`` is logged."""
  peak = [0, 0, 0]
  t0 = time.perf_counter()
  first_step_s = None
  with open(log, "a") as f:
    proc = subprocess.Popen(list(command), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
  stopped = False
  while proc.poll() is None:
    mem = tree_memory(proc.pid)
    if mem:
      peak = [max(a, b) for a, b in zip(peak, mem)]
    steps = [s for s in train_steps(workdir) if s > after]
    if steps and first_step_s is None:
      first_step_s = time.perf_counter() - t0
    if stop_at is not None and steps and max(steps) >= stop_at and not stopped:
      proc.send_signal(signal.SIGTERM)
      stopped = True
    time.sleep(0.5)
  steps = train_steps(workdir)
  return {"returncode": proc.returncode, "first_step_s": first_step_s,
          "wall_s": time.perf_counter() - t0, "last_step": max(steps, default=0),
          "peak_trainer_rss_gib": peak[0] / 2**30, "peak_tree_rss_gib": peak[1] / 2**30,
          "peak_tree_uss_gib": peak[2] / 2**30}


def epoch(root: Path, gib: float, keep: bool, real_count: int = 3000) -> list[dict[str, Any]]:
  from jaxdef.data.mixing import BatchPlan
  record_bytes = 32 * 32 * 3 + 40  # pixels + the msgpack map around them
  big_count = int(np.ceil(gib * 2**30 / record_bytes))
  big, real, runs = root / "generated", root / "real", root / "runs"
  out = []
  try:
    t0 = time.perf_counter()
    if not (big / "jaxdef_dataset.json").exists():
      write_generated(big, {"train": (big_count, random_raw(7))}, num_classes=10,
                      encoding="raw", image_shape=(32, 32, 3), channels=3, shards=16)
    if not (real / "jaxdef_dataset.json").exists():
      write_generated(real, {"train": (real_count, random_raw(8)), "test": (500, random_raw(9))},
                      num_classes=10, encoding="raw", image_shape=(32, 32, 3), channels=3,
                      shards=2)
    disk = sum(f.stat().st_size for f in big.iterdir())
    out.append({"case": "generated set", "images": big_count, "disk_gib": disk / 2**30,
                "write_s": time.perf_counter() - t0})
    batch, fraction = 128, 0.7
    plan = BatchPlan(num_real=real_count, global_batch=batch, seed=0, num_extra=big_count,
                     extra_fraction=fraction)
    half = plan.steps_per_epoch // 2
    workdir = runs / "small_cnn"
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "-m", "jaxdef", "train", "--config", "default",
               "--workdir", str(workdir),
               "--config.data.name=arrayrecord", f"--config.data.path={real}",
               f"--config.data.extra.path={big}", f"--config.data.extra_fraction={fraction}",
               "--config.data.augment=crop_flip", "--config.data.workers=1",
               "--config.model.kwargs={'width': 0.5}", f"--config.train.batch_size={batch}",
               "--config.attack.eps=0.03137", "--config.attack.step_size=0.00784",
               "--config.attack.steps=2", "--config.attack.warmup_epochs=0.0",
               "--config.train.epochs=1", "--config.train.log_every_steps=1",
               "--config.train.eval_examples=256", "--config.train.eval_batch_size=128",
               "--config.train.eval_pgd_steps=2", "--config.train.checkpoint_every_steps=1000"]
    log = root / "train.log"
    fresh = watch(command, workdir, 0, half, log)
    out.append({"case": "fresh run, stopped mid-epoch by SIGTERM", "steps_per_epoch":
                plan.steps_per_epoch, **fresh})
    resumed = watch(command, workdir, fresh["last_step"], None, log)
    out.append({"case": f"resumed at step {fresh['last_step']} to the end of the epoch",
                **resumed})
    out.append(data_resume_cost(real, big, plan, fresh["last_step"]))
  finally:
    if not keep:
      shutil.rmtree(root, ignore_errors=True)
  return out


def data_resume_cost(real: Path, big: Path, plan, step: int) -> dict[str, Any]:
  """Seconds to open the sources and make the first global batch, at step 0 and at ``step``."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from jaxdef.data.streamed import train_data
  sharding = NamedSharding(jax.make_mesh((1,), ("data",)), PartitionSpec("data"))
  times = {}
  for start in (0, 0, step):  # the first call pays the imports
    t0 = time.perf_counter()
    data, _ = train_data(data_config(str(real), extra={"path": str(big)},
                                     extra_fraction=plan.extra_fraction),
                         seed=0, global_batch=plan.global_batch, eval_examples=256)
    batches = data.batches(start, start + 1, sharding)
    jax.block_until_ready(next(batches))
    batches.close()
    times[start] = time.perf_counter() - t0
  return {"case": "data side of a start (in process, no workers)",
          "first_batch_s_at_step_0": times[0], f"first_batch_s_at_step_{step}": times[step]}


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("part", choices=("throughput", "epoch"))
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU test)")
  parser.add_argument("--dir", default="/tmp/jaxdef_bench_data",
                      help="where the generated data and runs go (deleted afterwards)")
  parser.add_argument("--gib", type=float, default=4.05, help="size of the generated set")
  parser.add_argument("--keep", action="store_true", help="keep the generated data")
  args = parser.parse_args(argv)
  root = Path(args.dir)
  if args.part == "throughput":
    with tempfile.TemporaryDirectory(dir=root.parent if root.parent.exists() else None) as tmp:
      results = throughput(args.smoke, Path(tmp))
  else:
    results = epoch(root, args.gib, args.keep)
  machine = {"cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
  for rec in results:
    print(json.dumps({**rec, **machine}, default=str), flush=True)
  return results


if __name__ == "__main__":
  main()
