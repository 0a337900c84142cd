"""Evaluation (docs/methods.md section 6), one module per idea:

* :mod:`.target`: what is attacked and scored (:class:`Target`);
* :mod:`.attacks`: the attacks by name (a registry);
* :mod:`.suite`: robust accuracy per attack over a test set, worst case;
* :mod:`.masking`: the gradient-masking checks;
* :mod:`.binarization`: the attack unit test (Zimmermann et al. 2022);
* :mod:`.report`: the table, ``results.json`` / ``results.md``, the eps-curve PNG;
* :mod:`.attention`: the Grad-CAM attention report (AAD);
* :mod:`.run`: a run directory in, its report out (``jaxdef eval``);
* :mod:`.autoattack_report`: AutoAttack as the reference library's users call it.
"""

from jaxdef.config import default_eval_config, resolve_eval_config  # noqa: F401
from jaxdef.evaluate.autoattack_report import autoattack_report  # noqa: F401
from jaxdef.evaluate.attacks import (JOINT_NEEDS_HEADS, LEAST_LIKELY,  # noqa: F401
                                     attack_names, iterll_steps, split_names, suite_attack)
from jaxdef.evaluate.binarization import binarization_test  # noqa: F401
from jaxdef.evaluate.masking import eps_curve, masking_checks  # noqa: F401
from jaxdef.evaluate.report import eps_curve_png, results_table, write_results  # noqa: F401
from jaxdef.evaluate.run import evaluate_and_report, evaluate_workdir, run_targets  # noqa: F401
from jaxdef.evaluate.suite import column, compile_attack, robust_flags, run_suite  # noqa: F401
from jaxdef.evaluate.target import Target, as_target  # noqa: F401
