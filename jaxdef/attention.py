"""Grad-CAM attention maps as AAD uses them (METHODS.md section 3), their overlap, pictures.

    maps = grad_cam(model, variables, x, labels, layer="stage3")   # (N, H, W)

For a tap point ``A`` (N, H', W', K) of any jaxdef model (see
:mod:`jaxdef.models.base`) and the **true** class logit ``z_y``:

* ``g = d z_y / d A``, obtained by differentiating with respect to a zeros
  ``perturbations`` collection at the tap points, then normalised by its
  root-mean-square over (H', W', K) per example: ``g / (rms(g) + 1e-5)``;
* channel weights ``w_k = mean_{h, w} g[..., k]``; ``cam = sum_k w_k A_k``;
* a softmax over the H'W' cells (the reference uses softmax, not ReLU), so
  the cells of one example sum to 1 (:attr:`AttentionMaps.cells`);
* bilinear resize to the input's H x W (:attr:`AttentionMaps.maps`).

Everything is differentiable with respect to the model's parameters (the
gradient ``g`` is itself differentiated: second order), which AAD's
preservation loss needs. The attention region ``Att = 1[cam > mean(cam)]``
carries no gradient.

``layer='auto'`` picks the deepest 4-D tap point with at least 8 x 8 cells
(the reference's 8 x 8 CIFAR layer): ``stage3`` of ResNet-18 on CIFAR-10,
``conv4`` of the small CNN on MNIST (8 x 8) and CIFAR-10 (10 x 10).

:func:`attention_report` is what ``launch.py --mode eval`` adds to the
evaluation suite: the mean IoU between the clean and the adversarial
attention regions, and a PNG grid of images and maps (next to a baseline run
when ``config.eval.compare_workdir`` names one).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdef.data.augment import to_float
from jaxdef.defenses.base import ApplyFn, apply_fn

Array = jax.Array
MIN_AUTO_CELLS = 8


class AttentionMaps(NamedTuple):
  """Grad-CAM of one batch.

  Attributes:
    cells: (N, H', W') softmax over the layer's cells; each example sums to 1.
    maps: (N, H, W) ``cells`` resized bilinearly to the input size.
    logits: (N, classes) of the same forward pass.
  """
  cells: Array
  maps: Array
  logits: Array


def resolve_layer(features: Mapping[str, Array], layer: str) -> str:
  """The tap point ``layer`` names; for 'auto' the deepest 4-D one with at least
  8 x 8 cells (else the deepest 4-D one). ``features`` in the model's order."""
  spatial = [n for n, a in features.items() if a.ndim == 4]
  if not spatial:
    raise ValueError("Grad-CAM needs a 4-D tap point; this model has none")
  if layer == "auto":
    large = [n for n in spatial if min(features[n].shape[1:3]) >= MIN_AUTO_CELLS]
    return (large or spatial)[-1]
  if layer not in spatial:
    raise ValueError(f"Grad-CAM layer {layer!r} is not a 4-D tap point of this model; "
                     f"valid: 'auto', {', '.join(spatial)}")
  return layer


def layer_gradient(apply: ApplyFn, x: Array, labels: Array, layer: str,
                   resolve: Callable[[Mapping[str, Array], str], str] = resolve_layer
                   ) -> tuple[Array, Array, Array]:
  """``(A, d z_y / d A, logits)`` at tap point ``layer`` for true labels ``labels``.

  The gradient is that of the batch sum of true-class logits with respect to
  a zeros perturbation at every tap point; an alias of a point (``stage3`` =
  ``stage3.1``) gets its gradient through the point's primary name.
  ``resolve(features, layer)`` names the tap point (default: Grad-CAM's
  :func:`resolve_layer`, 4-D points only; NIP passes one that also takes
  vectors such as ``penultimate``).
  """
  shapes = jax.eval_shape(lambda z: apply(z)["features"], x)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  names: list[str] = []

  def true_logits(perturbations):
    out = apply(x, perturbations=perturbations)
    features = out["features"]
    chosen = resolve(features, layer)
    # Every name of the chosen point holds the same array: primary name and aliases.
    names[:] = [n for n in features if features[n] is features[chosen]]
    signal = jnp.take_along_axis(out["logits"], labels[:, None], axis=-1)
    return jnp.sum(signal), (features[chosen], out["logits"])

  grads, (activation, logits) = jax.grad(true_logits, has_aux=True)(zeros)
  return activation, sum(grads[n] for n in names), logits


def grad_cam_cells(activation: Array, gradient: Array) -> Array:
  """Softmax Grad-CAM (N, H', W') from a layer's activation and gradient (N, H', W', K)."""
  a = activation.astype(jnp.float32)
  g = gradient.astype(jnp.float32)
  g = g / (jnp.sqrt(jnp.mean(jnp.square(g), axis=(1, 2, 3), keepdims=True)) + 1e-5)
  cam = jnp.einsum("nhwk,nk->nhw", a, jnp.mean(g, axis=(1, 2)))
  return jax.nn.softmax(cam.reshape(cam.shape[0], -1), axis=-1).reshape(cam.shape)


def attention_maps(apply: ApplyFn, x: Array, labels: Array, layer: str = "auto"
                   ) -> AttentionMaps:
  """Grad-CAM of ``apply`` on ``x`` (N, H, W, C) for the classes ``labels``."""
  activation, gradient, logits = layer_gradient(apply, x, labels, layer)
  cells = grad_cam_cells(activation, gradient)
  maps = jax.image.resize(cells, (x.shape[0], *x.shape[1:3]), "bilinear")
  return AttentionMaps(cells, maps, logits)


def grad_cam(model, variables: Mapping[str, Any], x: Array, labels: Array,
             layer: str = "auto", *, train: bool = False, resize: bool = True) -> Array:
  """Grad-CAM (N, H, W) of ``model`` with ``variables``; (N, H', W') if not ``resize``.

  ``train``: BatchNorm with the batch's statistics (not updated).
  """
  out = attention_maps(apply_fn(model, dict(variables), train=train), x, labels, layer)
  return out.maps if resize else out.cells


def attention_region(maps: Array) -> Array:
  """``Att = 1[cam > mean(cam)]`` per example, float32 of the maps' shape, no gradient."""
  maps = jax.lax.stop_gradient(maps)
  return (maps > jnp.mean(maps, axis=(1, 2), keepdims=True)).astype(jnp.float32)


def attention_iou(maps_a: Array, maps_b: Array) -> Array:
  """Intersection over union of the two attention regions, (N,) (1 where both are empty)."""
  a, b = attention_region(maps_a) > 0, attention_region(maps_b) > 0
  inter = jnp.sum(a & b, axis=(1, 2))
  union = jnp.sum(a | b, axis=(1, 2))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


# ----------------------------------------------------------------------------
# Pictures and the evaluation report.

def attention_grid_png(path: str, columns: int, rows: Sequence[tuple[str, np.ndarray,
                                                                     Optional[np.ndarray]]]
                       ) -> None:
  """Saves a grid: one row per ``(title, images (N, H, W, C), maps (N, H, W) or None)``,
  ``columns`` examples per row; maps are drawn over the images in grey."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns, 1.4 * len(rows)),
                           squeeze=False)
  for r, (title, images, maps) in enumerate(rows):
    for c in range(columns):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      image = np.clip(np.asarray(images[c], np.float32), 0, 1)
      if maps is None:
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image,
                  cmap="gray", vmin=0, vmax=1)
      else:
        ax.imshow(image.mean(-1), cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.asarray(maps[c]), cmap="jet", alpha=0.5)
    axes[r, 0].set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
  fig.tight_layout()
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


def attention_report(workdir: str, eval_config, x_test: np.ndarray, y_test: np.ndarray,
                     *, key: Optional[Array] = None) -> dict[str, Any]:
  """Clean vs adversarial Grad-CAM of the run in ``workdir`` (and of
  ``eval_config.compare_workdir`` if set): mean IoU of the attention regions
  and ``workdir/eval/attention.png`` (+ ``attention.json``).

  The adversarial images are PGD-20 (CE, random start) at ``eval_config.eps``
  with step ``eval_config.pgd_step_size`` on each model's own weights, for
  ``eval_config.attention_examples`` (default 200) test images evenly spaced
  over the test set; the picture shows one image per class first.
  """
  from jaxdef import attacks
  n = min(int(eval_config.get("attention_examples", 200)), len(x_test))
  # Evenly spaced over the test set: some test sets are sorted by class.
  chosen = np.linspace(0, len(x_test) - 1, n).round().astype(int)
  x = x_test[chosen]
  x = jnp.asarray(to_float(x))
  y = jnp.asarray(np.asarray(y_test)[chosen], jnp.int32)
  key = jax.random.key(int(eval_config.get("seed", 0))) if key is None else key
  runs = [("this run", workdir)]
  if eval_config.get("compare_workdir", ""):
    runs.append(("baseline", eval_config.compare_workdir))
  requested = str(eval_config.get("attention_layer", "auto"))
  report: dict[str, Any] = {"examples": n, "attack": "pgd20", "eps": float(eval_config.eps),
                            "runs": {}}
  from jaxdef.api import restore_model  # api -> build -> defenses -> aad -> attention
  shown = _one_per_class(np.asarray(y), 8)
  picture = [("image", np.asarray(x)[shown], None)]
  for name, run_dir in runs:
    config, model, variables, _ = restore_model(run_dir)
    apply = apply_fn(model, variables, train=False)
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
    picture += [(f"{title}\nclean", np.asarray(x)[shown], np.asarray(clean.maps)[shown]),
                (f"{title}\nPGD-20", np.asarray(x_adv)[shown], np.asarray(adv.maps)[shown])]
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  report["png"] = os.path.join(out, "attention.png")
  attention_grid_png(report["png"], len(shown), picture)
  with open(os.path.join(out, "attention.json"), "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  for name, r in report["runs"].items():
    print(f"attention ({name}, {r['defense']}, layer {r['layer']}): mean IoU of clean vs "
          f"PGD-20 attention regions {r['mean_iou']:.3f} on {n} test images")
  print(f"attention maps: {report['png']}")
  return report
