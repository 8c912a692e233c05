"""Every compression option is accepted and refused alike by each way in: the options type, ``TopKState``, the job
config, the command line (``--set`` and its flag), and the Lightning, Accelerate and Ray adapters.

The values tried come from each option's own definition (its type, choices or interval), so an option added to
:class:`raytopk.options.CompressionOptions` is covered without touching this file.
"""

import math
import warnings
from dataclasses import fields

import pytest
import torch
import yaml

from raytopk import TopKState
from raytopk.cli import build_parser, config_from_args
from raytopk.config import ConfigError, load_config
from raytopk.optim import MomentumCorrectedSGD
from raytopk.options import JOB_FORMS, CompressionOptions

OPTIONS = {f.name: f for f in fields(CompressionOptions)}


def _tried(f) -> list:
    """Values to try for option field ``f``: its default, what its choices or interval allow and the values just
    outside, and values of the wrong type."""
    values = [f.default, None, "text", [1]]
    if f.type is bool:
        return values + [True, False, 1, "yes"]
    if f.metadata["choices"]:
        return values + list(f.metadata["choices"]) + [f.metadata["choices"][0].upper(), 0]
    interval = f.metadata["interval"]
    low, high = (float(end) for end in interval[1:-1].split(","))
    values += [low, low - 1, low + 0.5, high, high + 1, math.nan, math.inf, -math.inf, True]
    if f.type is int:
        values += [int(low), int(low) + 1, int(low) - 1, 1.5]
    return values


CASES = [(name, value) for name, f in OPTIONS.items() for value in _tried(f)]


def _accepts(make) -> bool:
    try:
        make()
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_every_way_in_accepts_and_refuses_the_same_values(name, value):
    expected = _accepts(lambda: CompressionOptions(**{name: value}))
    assert _accepts(lambda: TopKState(**{name: value})) == expected, "TopKState"
    _adapters_agree(name, value, expected)
    if name in JOB_FORMS:  # a job sets it through its own key (momentum_correction, warmup_epochs)
        return
    job = {"compress": True, name: value}
    assert _accepts(lambda: load_config(sets=job)) == expected, "job config"
    assert _command_line_accepts(["--set", f"{name}={_yaml(value)}"]) == expected, "--set"
    if value is not None and not isinstance(value, (bool, list)) and OPTIONS[name].type is not bool:
        flag = "--" + name.replace("_", "-")
        assert _command_line_accepts([flag, str(value)]) == expected, flag


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _command_line_accepts(flags) -> bool:
    try:
        args = build_parser().parse_args(["train", "--compress", *flags])
    except SystemExit:  # argparse refused the flag's value (exit 2)
        return False
    return _accepts(lambda: config_from_args(args))


def _adapters_agree(name, value, expected):
    """Lightning's callback checks its options when built; Accelerate's ``attach`` before it looks for a DDP model;
    Ray's ``prepare_model`` before it looks for its worker's device (outside a Ray Train worker, it then stops)."""
    from accelerate import Accelerator

    import raytopk.accelerate
    from raytopk.lightning import TopKCompression
    from raytopk.ray import prepare_model

    assert _accepts(lambda: TopKCompression(**{name: value})) == expected, "Lightning"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not a DDP model: it warns and compresses nothing
        assert _accepts(lambda: raytopk.accelerate.attach(Accelerator(), torch.nn.Linear(2, 2), **{name: value})) == (
            expected
        ), "Accelerate"
    if name == "ratio" and value is None:
        return  # prepare_model's ratio=None is plain DDP
    model = torch.nn.Linear(2, 2)
    optimizer = (
        MomentumCorrectedSGD(model.parameters(), lr=0.1, momentum=value)
        if name == "momentum" and expected and value
        else None
    )
    try:
        prepare_model(model, optimizer=optimizer, **{name: value})
    except ConfigError:
        accepted = False
    except RuntimeError as stop:  # past the options: outside a Ray Train worker there is no device to move to
        assert "Ray Train" in str(stop), stop
        accepted = True
    assert accepted == expected, "Ray"


def test_the_adapters_refuse_an_optimizer_that_would_apply_momentum_correction_twice():
    """Momentum correction moves SGD's momentum into the hook: ``raytopk train`` refuses plain momentum SGD, and so
    does each adapter, before training starts."""
    from raytopk.ray import prepare_model

    model = torch.nn.Linear(2, 2)
    twice = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum correction"):
        prepare_model(model, ratio=0.01, momentum=0.9, optimizer=twice)
    with pytest.raises(ValueError, match="needs optimizer="):
        prepare_model(model, ratio=0.01, momentum=0.9)
    with pytest.raises(ValueError, match="momentum_correction: true with optimizer"):
        load_config(compress=True, momentum_correction=True, optimizer="adamw")

    from accelerate import Accelerator

    import raytopk.accelerate

    accelerator = Accelerator()
    prepared, prepared_twice = accelerator.prepare(model, twice)
    with pytest.raises(ValueError, match="momentum correction"):
        raytopk.accelerate.attach(accelerator, prepared, momentum=0.9)

    import lightning as L

    from raytopk.lightning import TopKCompression

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, _):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        callbacks=[TopKCompression(momentum=0.9)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    with pytest.raises(ValueError, match="momentum correction"):
        trainer.fit(Module(), data)
