"""The configs jaxdef ships, imported as ``jaxdef.configs``.

They live in ``configs/`` at the top of the repository; ``jaxdef/configs`` is
a link to that folder, so a checkout, an editable install and a wheel (which
holds copies of the files) all import them as ``jaxdef.configs.<name>``, and
``jaxdef train --config pgd_at:cifar10_resnet18`` works after a plain
``pip install .`` while ``--config configs/pgd_at.py:cifar10_resnet18`` keeps
working from a checkout. Configs import each other as ``jaxdef.configs.<name>``.
``jaxdef configs`` lists them (:mod:`jaxdef.shipped`).
"""
