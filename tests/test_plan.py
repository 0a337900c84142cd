"""``jaxdef plan``: the run's steps compiled for a TPU topology this host does not have.

The pure parts (the arithmetic and wording of the plan's lines, the "does
not fit" verdict, the HLO all-reduce count, the FLOP count, the data's shape
without the data) run on any backend. One test compiles the small CNN's
steps for a v5e:2x2 slice where libtpu is installed (the Python 3.12 CI
pass installs it); without libtpu it is skipped, saying so.
"""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxdef.errors import ConfigError
from jaxdef.train import plan as planning
from jaxdef.train.plan import (CHIPS, AllReduce, Chip, Memory, Plan, StepPlan, all_reduce,
                               chip_of, fits, out_of_memory, plan_lines, shapes_bytes)

V5E = chip_of("TPU v5 lite")
NO_LIBTPU = "libtpu is not installed (pip install 'jax[tpu]'): nothing compiles for a TPU here"


def run_jaxdef(capsys, *argv):
  from jaxdef.cli import run
  status = run([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


def test_chips_have_their_published_peak_and_hbm():
  assert V5E == Chip("v5e", "TPU v5 lite", 16 * 2 ** 30, 197e12)
  assert {c.name: c.peak_bf16_flops / 1e12 for c in CHIPS} == {
      "v4": 275, "v5e": 197, "v5p": 459, "v6e": 918}
  assert {c.name: c.hbm_bytes / 2 ** 30 for c in CHIPS} == {
      "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
  assert chip_of("TPU v3") is None


def test_hlo_array_bytes_ignore_layouts_and_tiles():
  # A tuple of a tiled f32 kernel, a bf16 vector and an f32 scalar.
  text = "(f32[3,3,8,16]{3,2,1,0:T(8,128)S(1)}, bf16[10]{0:T(128)}, f32[]{:T(128)})"
  assert shapes_bytes(text) == (3 * 3 * 8 * 16 * 4 + 10 * 2 + 4, 3 * 3 * 8 * 16 + 10 + 1)


HLO = """HloModule jit_train_step

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%inner (p: f32[64]) -> f32[64] {
  %ar.2 = f32[64]{0:T(128)} all-reduce(%p), replica_groups={}, to_apply=%add
}

%body (t: (s32[], f32[64])) -> (s32[], f32[64]) {
  %c = f32[64]{0} call(%x), to_apply=%inner
}

%cond (t: (s32[], f32[64])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (w: f32[1000,10]) -> f32[1000,10] {
  %while.1 = (s32[], f32[64]) while(%t), condition=%cond, body=%body
  %all-reduce.7 = (f32[1000,10]{1,0:T(8,128)}, f32[10]{0}) all-reduce(%g, %b), to_apply=%add
  %all-reduce-start.1 = f32[]{:T(128)} all-reduce-start(%loss), to_apply=%add
  %all-reduce-done.1 = f32[]{:T(128)} all-reduce-done(%all-reduce-start.1)
}
"""


def test_all_reduce_counts_each_step_once_and_loops_apart():
  got = all_reduce(HLO)
  # The tuple (gradient + bias) and the asynchronous scalar; the -done is not a second one.
  assert got == AllReduce(bytes=(10000 + 10 + 1) * 4, values=10011, ops=2, loop_bytes=64 * 4)


def test_memory_total_counts_donated_outputs_once():
  m = Memory(arguments=100, temporaries=50, outputs=90, aliased=80, code=7)
  assert m.total == 100 + 50 + 90 - 80 + 7
  assert fits(m, V5E) is True
  assert fits(Memory(16 * 2 ** 30, 1, 0, 0, 0), V5E) is False
  assert fits(m, None) is None


def step(kind="train", flops=197e9, memory=Memory(2 ** 30, 2 ** 30, 2 ** 20, 2 ** 20, 0),
         refused=""):
  collectives = None if refused else AllReduce(4 * 11_000_000, 11_000_000, 3, 0)
  return StepPlan(kind, global_batch=128, chips=8, compile_s=12.34, flops=flops,
                  memory=None if refused else memory, collectives=collectives, refused=refused)


def test_plan_lines_give_memory_flops_peak_time_and_all_reduce_one_line_each():
  lines = plan_lines("pgd_at:cifar10_resnet18", Plan("v5e:2x4", "TPU v5 lite", 8,
                                                     (step(), step("eval")), 11_000_000))
  assert lines[0].startswith("pgd_at:cifar10_resnet18 on v5e:2x4: 8 x TPU v5 lite; jax ")
  assert lines[1] == "train step: global batch 128 (16 per chip), compiled in 12.3 s"
  assert lines[2] == ("  memory per chip: arguments 1.00 GiB, temporaries 1.00 GiB, outputs "
                      "1.00 MiB (1.00 MiB of them in donated arguments), code 0 B: 2.00 GiB of "
                      "16.00 GiB HBM: fits")
  assert lines[3] == ("  FLOPs per step: 197 GFLOP per chip, 1.58 TFLOP in all "
                      "(PGD loops unrolled, XLA's count)")
  # 197 GFLOP at 197 TFLOP/s: 1 ms, so 128 images in 1 ms.
  assert lines[4] == ("  step time at peak: 1 ms at v5e's bf16 peak of 197 TFLOP/s per chip, "
                      "128,000 images/s (a lower bound)")
  assert lines[5] == ("  all-reduce per step: 41.96 MiB per chip in 3 operation(s), 11,000,000 "
                      "values (gradients of 11,000,000 parameters in float32: 41.96 MiB)")
  assert lines[6].startswith("eval step (clean + PGD): ")
  assert len(lines) == 10 and not any("all-reduce" in l for l in lines[7:])
  assert not any("not fit" in l.lower() for l in lines)


def test_a_plan_that_does_not_fit_says_so():
  over = step(memory=Memory(15 * 2 ** 30, 2 * 2 ** 30, 0, 0, 0))
  plan = Plan("v5e:2x4", "TPU v5 lite", 8, (over, step("eval")), 11_000_000)
  assert not plan.fits
  lines = plan_lines("c", plan)
  assert lines[2].endswith("17.00 GiB of 16.00 GiB HBM: DOES NOT FIT")
  assert lines[-1].startswith("does not fit on v5e:2x4: lower train.batch_size")
  refused = step(refused="Ran out of memory on HBM, ... exceeds available HBM (15.75G)")
  plan = Plan("v5e:2x4", "TPU v5 lite", 8, (refused,), 11_000_000)
  assert not plan.fits
  assert plan_lines("c", plan)[2] == ("  memory per chip: does not fit: the TPU compiler refused "
                                      "it: Ran out of memory on HBM, ... exceeds available HBM "
                                      "(15.75G)")


def test_an_unknown_chip_gets_memory_and_flops_but_no_verdict():
  plan = Plan("v3:2x2", "TPU v3", 8, (step(),), 11_000_000)
  lines = plan_lines("c", plan)
  assert plan.fits
  assert lines[2].endswith("(HBM of this chip not known)")
  assert lines[4] == "  step time at peak: this chip's bf16 peak is not known"


def test_the_compilers_out_of_memory_message_becomes_one_line():
  error = RuntimeError(
      "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total\n"
      "memory required for HLO temporaries (16.00G) exceeds available HBM (15.75G). HLO "
      "module: jit__lambda. See https://openxla.org/xla/errors/error_1000 for more details.")
  assert out_of_memory(error) == ("Ran out of memory on HBM, the total memory required for HLO "
                                  "temporaries (16.00G) exceeds available HBM (15.75G)")
  assert out_of_memory(RuntimeError("INTERNAL: something else")) == ""


def test_without_libtpu_plan_says_how_to_install_it(monkeypatch, capsys):
  monkeypatch.setattr(planning, "libtpu_version", lambda: None)
  with pytest.raises(ConfigError, match=rf"pip install 'jax\[tpu\]=={jax.__version__}'"):
    planning.topology_devices("v5e:2x2")
  status, out, err = run_jaxdef(capsys, "plan", "--config", "default", "--topology", "v5e:2x2")
  assert status == 2 and out == ""
  assert err.count("\n") == 1 and err.startswith("error: jaxdef plan compiles with libtpu")


def test_plan_needs_a_topology(capsys):
  status, _, err = run_jaxdef(capsys, "plan", "--config", "default")
  assert status == 2 and err == "error: missing --topology\n"


def test_planned_pgd_loops_stay_rolled_as_on_an_accelerator():
  config = tiny_config()
  assert config.attack.unroll == 0 and planning.as_planned(config).attack.unroll == 1
  config.attack.unroll = 3
  assert planning.as_planned(config).attack.unroll == 3


def test_step_flops_count_every_pgd_iteration():
  """XLA counts a while body once; the plan's count grows by the same amount per step."""
  def flops(steps):
    config = tiny_config(**{"attack.steps": steps})
    return planning.step_flops(config, planning.plan_meta(config.data), "train")
  two, three, five = flops(2), flops(3), flops(5)
  assert three > two > 0
  np.testing.assert_allclose(five - three, 2 * (three - two), rtol=1e-6)


def test_the_data_shape_comes_without_reading_the_data():
  config = tiny_config()
  assert planning.plan_meta(config.data).image_shape == (28, 28, 1)
  config.data.update(name="cifar10", data_dir="/nonexistent/tfds")
  meta = planning.plan_meta(config.data)
  assert (meta.image_shape, meta.num_classes) == ((32, 32, 3), 10)
  config.data.update(augment="rrc_flip", image_size=64)
  assert planning.plan_meta(config.data).image_shape == (64, 64, 3)


@pytest.mark.skipif(planning.libtpu_version() is None, reason=NO_LIBTPU)
def test_small_cnn_steps_compile_for_a_v5e_2x2_slice(monkeypatch):
  # No TPU is in use on a host that runs the suite; lets a second process load libtpu.
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  config = tiny_config(**{"train.batch_size": 16, "train.eval_batch_size": 16})
  printed = []
  plan = planning.print_plan("default", config, "v5e:2x2", out=printed.append)
  assert printed == plan_lines("default", plan)  # step by step, the same lines
  assert (plan.chips, plan.device_kind, plan.fits) == (4, "TPU v5 lite", True)
  train, evaluate = plan.steps
  assert (train.kind, evaluate.kind, train.global_batch, train.chips) == ("train", "eval", 16, 4)
  meta = planning.plan_meta(config.data)
  for s in plan.steps:
    assert s.flops * 4 == planning.step_flops(planning.as_planned(config), meta, s.kind)
  # The replicated state (parameters, momentum, EMA copy) is an argument on every chip.
  assert train.memory.arguments >= 3 * 4 * plan.num_params
  assert train.memory.aliased >= 3 * 4 * plan.num_params  # donated: updated in place
  # Every parameter's float32 gradient is summed over the chips once per step.
  assert train.collectives.values >= plan.num_params
  assert train.collectives.bytes >= 4 * plan.num_params
  assert printed[2].endswith("of 16.00 GiB HBM: fits")
  # An evaluation batch of a million images per chip does not fit: the compiler says so.
  config.train.eval_batch_size = 4 * 2 ** 20
  too_big = planning.plan(config, "v5e:2x2", kinds=("eval",))
  assert not too_big.fits and "HBM" in too_big.steps[0].refused
