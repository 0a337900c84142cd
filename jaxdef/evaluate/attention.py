"""The evaluation's attention report (AAD, docs/methods.md section 3).

:func:`attention_report` is what ``jaxdef eval`` adds to the suite:
the mean IoU between the clean and the adversarial Grad-CAM attention
regions (:mod:`jaxdef.saliency`), and a PNG grid of images and maps (next to
a baseline run when ``config.eval.compare_workdir`` names one).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdef import attacks
from jaxdef.data.augment import to_float
from jaxdef.models.base import apply_fn
from jaxdef.restored import Restored, load_run
from jaxdef.saliency import attention_iou, attention_maps

Array = jax.Array


# One row of the attention picture: (row title, images (N, H, W, C), Grad-CAM maps
# (N, H, W) or None, a caption per image or None).
Row = tuple[str, np.ndarray, Optional[np.ndarray], Optional[Sequence[str]]]


def attention_grid_png(path: str, columns: int, rows: Sequence[Row], *,
                       title: str = "") -> None:
  """Saves a grid: one row per :data:`Row`, ``columns`` examples per row, a
  figure ``title``. Each map is scaled to [0, 1] within its image and drawn
  over the image in grey; one colour bar explains the scale; captions (e.g.
  true and predicted labels) go under the images."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns + 1.0, 1.6 * len(rows)),
                           squeeze=False)
  drawn = None
  for r, (name, images, maps, captions) in enumerate(rows):
    for c in range(columns):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      image = np.clip(np.asarray(images[c], np.float32), 0, 1)
      if maps is None:
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image,
                  cmap="gray", vmin=0, vmax=1)
      else:
        m = np.asarray(maps[c], np.float32)
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        ax.imshow(image.mean(-1), cmap="gray", vmin=0, vmax=1)
        drawn = ax.imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=1)
      if captions is not None:
        ax.set_xlabel(captions[c], fontsize=6)
    axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
  if title:
    fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  if drawn is not None:
    bar = fig.colorbar(drawn, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
    bar.set_label("attention within the image (0 lowest, 1 highest)", fontsize=6)
    bar.ax.tick_params(labelsize=6)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _one_per_class(labels: np.ndarray, count: int) -> np.ndarray:
  """Indices of up to ``count`` examples, the first of each class first, then
  the next ones in order."""
  first = np.unique(labels, return_index=True)[1]
  rest = np.setdiff1d(np.arange(len(labels)), first)
  return np.concatenate([np.sort(first), rest])[:count]


def _run_layer(config, requested: str) -> str:
  """The layer to draw: ``eval.attention_layer``, else the AAD run's own, else 'auto'."""
  if requested != "auto":
    return requested
  if config.defense.name == "aad":
    return config.defense.get("kwargs", {}).get("layer", "auto")
  return "auto"


def attention_report(run: Restored, eval_config, x_test: np.ndarray, y_test: np.ndarray,
                     *, key: Optional[Array] = None, out: Optional[str] = None,
                     provenance: Optional[dict] = None) -> dict[str, Any]:
  """Clean vs adversarial Grad-CAM of ``run`` (and of the run in
  ``eval_config.compare_workdir`` if set): mean IoU of the attention regions
  and ``out/attention.png`` (+ ``attention.json``, with ``provenance``;
  ``out`` defaults to ``run.workdir/eval``).

  The adversarial images are PGD-20 (CE, random start) at ``eval_config.eps``
  with step ``eval_config.pgd_step_size`` on each model's own weights, for
  ``eval_config.attention_examples`` (default 200, at most
  ``eval_config.num_examples``) test images evenly spaced over the test set;
  the picture shows one image per class first.
  """
  n = min(int(eval_config.get("attention_examples", 200)),
          int(eval_config.get("num_examples", len(x_test))), len(x_test))
  # Evenly spaced over the test set: some test sets are sorted by class.
  chosen = np.linspace(0, len(x_test) - 1, n).round().astype(int)
  x = x_test[chosen]
  x = jnp.asarray(to_float(x))
  y = jnp.asarray(np.asarray(y_test)[chosen], jnp.int32)
  key = jax.random.key(int(eval_config.get("seed", 0))) if key is None else key
  runs = [("this run", run)]
  if eval_config.get("compare_workdir", ""):
    runs.append(("baseline", load_run(eval_config.compare_workdir)))
  requested = str(eval_config.get("attention_layer", "auto"))
  report: dict[str, Any] = {"examples": n, "attack": "pgd20", "eps": float(eval_config.eps),
                            "runs": {}}
  shown = _one_per_class(np.asarray(y), 8)
  picture: list[Row] = [("image", np.asarray(x)[shown], None,
                         [f"true {int(c)}" for c in np.asarray(y)[shown]])]
  for name, each in runs:
    config, run_dir = each.config, each.workdir
    apply = apply_fn(each.model, each.variables, train=False)
    layer = _run_layer(config, requested)
    logits_fn = lambda z: apply(z)["logits"]
    x_adv = attacks.pgd(logits_fn, x, y, key=key, eps=float(eval_config.eps),
                        step_size=float(eval_config.pgd_step_size), steps=20,
                        norm=eval_config.norm)
    maps = jax.jit(lambda z: attention_maps(apply, z, y, layer))
    clean, adv = maps(x), maps(x_adv)
    iou = attention_iou(clean.maps, adv.maps)
    report["runs"][name] = {
        "workdir": run_dir, "defense": config.defense.name, "layer": layer,
        "mean_iou": float(jnp.mean(iou)),
        "clean_acc": float(jnp.mean(jnp.argmax(clean.logits, -1) == y)),
        "adv_acc": float(jnp.mean(jnp.argmax(adv.logits, -1) == y))}
    title = f"{os.path.basename(os.path.normpath(run_dir))}\n({name})"
    clean_pred = np.asarray(jnp.argmax(clean.logits, -1))[shown]
    adv_pred = np.asarray(jnp.argmax(adv.logits, -1))[shown]
    picture += [(f"{title}\nclean", np.asarray(x)[shown], np.asarray(clean.maps)[shown],
                 [f"pred {int(p)}" for p in clean_pred]),
                (f"{title}\nPGD-20", np.asarray(x_adv)[shown], np.asarray(adv.maps)[shown],
                 [f"pred {int(p)}" + (" FOOLED" if c == t != p else "")
                  for p, c, t in zip(adv_pred, clean_pred, np.asarray(y)[shown])])]
  out = out or os.path.join(run.workdir, "eval")
  os.makedirs(out, exist_ok=True)
  if provenance:
    report["provenance"] = provenance
  report["png"] = os.path.join(out, "attention.png")
  layers = ", ".join(sorted({r["layer"] for r in report["runs"].values()}))
  attention_grid_png(report["png"], len(shown), picture,
                     title=f"Grad-CAM of the true class at {layers}: clean vs PGD-20 at eps "
                           f"{float(eval_config.eps):.4g} (FOOLED: right when clean, wrong "
                           f"when attacked)")
  with open(os.path.join(out, "attention.json"), "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  for name, r in report["runs"].items():
    print(f"attention ({name}, {r['defense']}, layer {r['layer']}): mean IoU of clean vs "
          f"PGD-20 attention regions {r['mean_iou']:.3f} on {n} test images")
  print(f"attention maps: {report['png']}")
  return report
