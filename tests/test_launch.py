"""The command line end to end (``jaxdef`` and ``launch.py``), and its one-line errors.

Most mistakes are checked in-process through :func:`jaxdef.cli.run` (the
command's whole code path, without a new interpreter per case); the
subprocess tests cover what needs one: launch.py itself, several devices.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--config.data.max_train=64", "--config.data.max_test=32",
         "--config.train.batch_size=16", "--config.train.epochs=1",
         "--config.attack.steps=2", "--config.attack.warmup_epochs=0.0",
         "--config.model.kwargs.width=0.25", "--config.train.eval_examples=32",
         "--config.train.eval_batch_size=16", "--config.train.eval_pgd_steps=2"]


def launch(*args, devices=None, timeout=600, **env_vars):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def test_default_config_trains_end_to_end_for_a_few_steps(tmp_path):
  cache, workdir = tmp_path / "xla_cache", tmp_path / "run"
  run = launch("--config", "configs/default.py", "--workdir", str(workdir), *QUICK,
               JAXDEF_COMPILATION_CACHE=str(cache))
  assert run.returncode == 0, run.stderr[-3000:]
  assert "clean_acc" in run.stdout and "pgd_acc" in run.stdout
  # Redirected output: plain progress lines, no carriage returns or padding.
  assert "\r" not in run.stderr and "train: 0/4 step (0%)" in run.stderr, run.stderr[-2000:]
  saved = json.load(open(workdir / "config.json"))
  assert saved["config"]["model"]["name"] == "small_cnn"
  assert saved["data_meta"]["image_shape"] == [28, 28, 1]
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["split"] == "summary"
  assert (workdir / "checkpoints" / "4").is_dir()
  # The compiled programs are kept for the next process (persistent cache).
  assert cache.is_dir() and any(cache.iterdir())
  # `jaxdef eval` without --config evaluates the run with its own config.json,
  # overridden field by field.
  from jaxdef.cli import run as jaxdef
  assert jaxdef(["eval", "--workdir", str(workdir), "--config.eval.num_examples=8",
                 "--config.eval.attacks=clean,fgsm", "--config.eval.masking_checks=False",
                 "--config.eval.attention=False", "--config.eval.unit_test=off",
                 f"--config.eval.surrogate_workdir={workdir}",
                 "--config.eval.transfer_attacks=fgsm"]) == 0
  results = json.load(open(next((workdir / "eval").glob("step_4_*")) / "results.json"))
  assert results["num_examples"] == 8 and set(results["attacks"]) == {"fgsm", "transfer fgsm"}
  # FGSM made on the same model transfers exactly: no transfer failure.
  assert results["indicators"]["white-box attacks"] == {"transfer failure": 0}


def _one_line_error(run, *words):
  assert run.returncode == 2, (run.stdout[-2000:], run.stderr[-2000:])
  errors = [l for l in run.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, run.stderr[-2000:]
  assert "Traceback" not in run.stderr
  for w in words:
    assert w in errors[0], errors[0]


def run_jaxdef(capsys, *argv):
  """``jaxdef *argv`` in this process: an object like a finished subprocess."""
  from jaxdef.cli import run
  status = run(list(argv))
  out, err = capsys.readouterr()
  return subprocess.CompletedProcess(argv, status, out, err)


@pytest.mark.parametrize("override,words", [
    ("--config.model.name=resnet9000", ("unknown model", "small_cnn", "resnet18")),
    # the default config's model.kwargs (width) belong to small_cnn, not ResNet-18
    ("--config.model.name=resnet18", ("model 'resnet18'", "width", "takes:")),
    # an ImageNet model on the default's 28 px digits, before anything is built
    ("--config.model.name=resnet50", ("resnet50", "224 px", "mnist5k", "image_size")),
    ("--config.data.name=imagenet", ("unknown dataset", "mnist5k", "cifar10")),
    ("--config.defense.name=magic", ("unknown defense", "none")),
    ("--config.attack.eps=-0.1", ("eps",)),
    ("--config.attack.eps=3.0", ("eps",)),
    ("--config.attack.step_size=0.0", ("step_size",)),
])
def test_bad_config_is_one_line_without_traceback(tmp_path, capsys, override, words):
  _one_line_error(run_jaxdef(capsys, "train", "--config", "configs/default.py",
                             "--workdir", str(tmp_path), override), *words)


@pytest.mark.parametrize("args,words", [
    (("--config", "configs/default.py", "--config.train.epocs=1"),
     ("unknown config field config.train.epocs", "did you mean 'epochs'")),
    (("--config", "configs/pgd_at.py:nope"), ("unknown variant 'nope'", "cifar10_resnet18")),
    (("--config", "pgd_at:nope"), ("unknown variant 'nope'", "cifar10_resnet18")),
    (("--config", "default:x"), ("default has no variants",)),
    (("--config", "configs/nofile.py"), ("config file not found", "configs/nofile.py")),
    (("--config", "defualt"), ("unknown config 'defualt'", "did you mean default")),
    (("--config", "default", "extra"), ("unexpected argument 'extra'",)),
    (("--config", "default", "--no_such_flag=1"), ("no_such_flag",)),
    (("--config", "configs/default.py", "--config.train.epochs=abc"),
     ("--config.train.epochs=abc",)),
    # A fraction is read as its value: 300/255 > 1 is then refused as an eps.
    (("--config", "configs/default.py", "--config.attack.eps=300/255"), ("eps", "1.17647")),
])
def test_command_line_mistakes_are_one_line(tmp_path, capsys, args, words):
  _one_line_error(run_jaxdef(capsys, "train", *args, "--workdir", str(tmp_path)), *words)


def test_launch_py_reports_mistakes_in_one_line_too(tmp_path):
  _one_line_error(launch("--config", "configs/default.py", "--workdir", str(tmp_path),
                         "--config.train.epocs=1"), "did you mean 'epochs'")
  _one_line_error(launch("--config", "configs/default.py", "--workdir", str(tmp_path),
                         "--mode", "evaluate"), "unknown --mode 'evaluate'")


@pytest.mark.parametrize("argv,words", [
    (("trian",), ("unknown command 'trian'", "did you mean 'train'")),
    (("train", "--config", "default"), ("missing --workdir",)),
    (("eval", "--workdir", "/nonexistent/run"), ("no trained run", "jaxdef train")),
])
def test_commands_and_their_required_flags_are_one_line_errors(capsys, argv, words):
  _one_line_error(run_jaxdef(capsys, *argv), *words)


def test_compilation_cache_folder_follows_the_environment():
  from jaxdef.cli import compilation_cache_dir
  assert compilation_cache_dir({"XDG_CACHE_HOME": "/c"}) == "/c/jaxdef/xla"
  assert compilation_cache_dir({"JAXDEF_COMPILATION_CACHE": "/x"}) == "/x"
  for off in ("off", "0", "false", ""):
    assert compilation_cache_dir({"JAXDEF_COMPILATION_CACHE": off}) is None
  assert compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/j"}) is None  # JAX's own


def test_budget_fractions_and_error_lines_without_a_subprocess():
  from jaxdef.cli import flag_error, with_fractions
  argv = ["launch.py", "--config.attack.eps=8/255", "--config.eval.pgd_step_size=2/255",
          "--config.train.optimizer.lr=1/10", "--config.data.path=runs/8/255",
          "--config.attack.eps_x=8/0", "--workdir=a/b"]
  out = with_fractions(argv)
  assert float(out[1].split("=")[1]) == 8 / 255 and float(out[2].split("=")[1]) == 2 / 255
  assert float(out[3].split("=")[1]) == 0.1
  assert out[4:] == argv[4:]          # a path, a zero denominator, a non-config flag
  try:
    {"epochs": 1}["epocs"]
  except KeyError as e:
    assert flag_error(e, ["--config.train.epocs=3"]) == (
        "unknown config field config.train.epocs; see the config file for its fields")
  assert flag_error(ValueError("line one\nValueError: the last line"), []) == (
      "cannot load the config: ValueError: the last line")


def test_batch_not_divisible_by_devices_is_reported(tmp_path):
  run = launch("--config", "configs/default.py", "--workdir", str(tmp_path),
               "--config.train.batch_size=50", devices=8)
  _one_line_error(run, "batch_size=50", "8")


def test_missing_tfds_data_names_the_prepare_command(tmp_path, capsys):
  run = run_jaxdef(capsys, "train", "--config", "pgd_at:cifar10_resnet18",
                   "--workdir", str(tmp_path), f"--config.data.data_dir={tmp_path / 'no_data'}")
  _one_line_error(run, "python -m jaxdef.data.prepare --dataset cifar10")
  assert not (tmp_path / "checkpoints").exists(), "nothing is started before the error"


def test_missing_npz_file_is_reported(tmp_path, capsys):
  run = run_jaxdef(capsys, "train", "--config", "default", "--workdir", str(tmp_path),
                   "--config.data.name=npz", f"--config.data.path={tmp_path / 'x.npz'}")
  _one_line_error(run, "x.npz")


def test_eval_of_an_untrained_workdir_is_reported(tmp_path, capsys):
  run = run_jaxdef(capsys, "eval", "--config", "configs/default.py", "--workdir", str(tmp_path))
  _one_line_error(run, "no trained run", "jaxdef train --config")


def test_a_run_without_checkpoints_says_train_first(tmp_path):
  from jaxdef.errors import ConfigError
  from jaxdef import checkpoint as ckpt
  (tmp_path / "checkpoints").mkdir()  # a run stopped before its first save
  with pytest.raises(ConfigError, match="no checkpoint .* train first"):
    ckpt.latest_step(str(tmp_path))


def test_evaluating_an_unfinished_run_warns(tmp_path):
  from jaxdef.train.metrics import MetricsLog, unfinished_run_warning
  assert unfinished_run_warning(str(tmp_path)) is None  # no log: nothing to say
  log = MetricsLog(str(tmp_path))
  log.write({"step": 13, "split": "train", "loss": 2.0})
  warning = unfinished_run_warning(str(tmp_path))
  assert warning is not None and "has not finished" in warning and "step 13" in warning
  log.write({"split": "summary", "steps": 40})
  assert unfinished_run_warning(str(tmp_path)) is None


def test_configs_lists_every_shipped_config_with_its_variants(capsys):
  from jaxdef import shipped
  out = run_jaxdef(capsys, "configs").stdout
  files = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                 if f.endswith(".py") and not f.startswith("_"))
  assert shipped.names() == files
  for name in files:
    assert f"\n{name}\n" in f"\n{out}", name
  assert "cifar10_resnet18, cifar10_preact_resnet18" in out       # pgd_at's variants
  assert "The offline default: PGD adversarial training" in out    # default's summary


def test_show_config_resolves_a_shipped_name_like_its_file(capsys):
  by_name = run_jaxdef(capsys, "show-config", "--config", "pgd_at:svhn_resnet18",
                       "--config.attack.eps=8/255")
  by_file = run_jaxdef(capsys, "show-config", "--config", "configs/pgd_at.py:svhn_resnet18",
                       "--config.attack.eps", "8/255")
  assert by_name.returncode == by_file.returncode == 0
  assert by_name.stdout == by_file.stdout
  assert "name: svhn_cropped" in by_name.stdout
  assert f"eps: {8 / 255!r}" in by_name.stdout


def test_show_config_prints_the_eval_section_the_evaluation_uses(capsys):
  """A paper variant's protocol fixes eval fields: show-config prints them as
  ``jaxdef eval`` resolves them, not the section's values before the protocol."""
  import yaml
  from jaxdef.config import resolve_eval_config
  from jaxdef.configs.cifar10_resnet18_defenses import get_config
  out = run_jaxdef(capsys, "show-config", "--config", "cifar10_resnet18_defenses:at_cas_paper")
  assert out.returncode == 0
  shown = yaml.unsafe_load(out.stdout)["eval"]
  config = get_config("at_cas_paper")
  # Before the protocol: the common variants' C&W and PGD step (eps / 10).
  assert config.eval.cw_steps == 30 and abs(config.eval.pgd_step_size - 0.8 / 255) < 1e-12
  used = resolve_eval_config(config.eval, eps=config.attack.eps, norm=config.attack.norm)
  assert shown == used.to_dict()
  assert (shown["cw_steps"], shown["cw_kappa"], shown["fgsm_random_start"]) == (20, 0.0, True)
  assert shown["pgd_step_size"] == 0.003 and shown["attacks"].endswith(",autoattack")
  # An override of a field the protocol leaves alone shows through.
  again = run_jaxdef(capsys, "show-config", "--config", "cifar10_resnet18_defenses:at_cas_paper",
                     "--config.eval.num_examples=200")
  assert yaml.unsafe_load(again.stdout)["eval"]["num_examples"] == 200


def test_help_lists_the_flags_variants_and_fields(capsys):
  top = run_jaxdef(capsys, "--help").stdout
  assert all(c in top for c in ("train", "eval", "configs", "show-config"))
  plain = run_jaxdef(capsys, "train", "--help").stdout
  assert "--workdir" in plain and "shipped configs" in plain and "aad_mnist" in plain
  detailed = run_jaxdef(capsys, "train", "--config", "aad_mnist", "--help").stdout
  assert "variants of aad_mnist: aad, stepll, aad_pgd, paper" in detailed
  assert "fields (override any with --config.<field>=value)" in detailed
  assert "masking_checks: true" in detailed


def test_an_old_run_gets_todays_eval_fields():
  import ml_collections
  from jaxdef.cli import with_current_eval_fields
  old = ml_collections.ConfigDict({"model": {"name": "small_cnn"},
                                   "eval": {"num_examples": 7, "attacks": "clean,fgsm"}})
  new = with_current_eval_fields(old)
  assert new.eval.num_examples == 7 and new.eval.attacks == "clean,fgsm"   # the run's own
  assert new.eval.unit_test == "cheap" and new.eval.transfer_attacks == "pgd20"  # added since
  assert new.model.name == "small_cnn" and "unit_test" not in old.eval
