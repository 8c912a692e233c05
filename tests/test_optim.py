"""MomentumCorrectedSGD: with the hook's velocity as its gradient it is momentum SGD, weight decay included."""

import copy

import pytest
import torch

from raytopk import MomentumCorrectedSGD, TopKState

MOMENTUM, WEIGHT_DECAY, LR = 0.9, 0.05, 0.1


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(5))]


def _gradients(steps):
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(7, 3, generator=generator), torch.randn(5, generator=generator)] for _ in range(steps)]


def _train(optimizer, params, gradients, velocities=None):
    """Steps of ``optimizer``; with ``velocities``, each gradient first goes through momentum as the hook's does."""
    for step in gradients:
        for i, (p, g) in enumerate(zip(params, step)):
            if velocities is not None:
                velocities[i] = MOMENTUM * velocities[i] + g
                g = velocities[i]
            p.grad = g.clone()
        optimizer.step()


def test_the_hooks_velocity_through_it_is_momentum_sgd_with_weight_decay():
    gradients = _gradients(8)
    dense = _params()
    _train(torch.optim.SGD(dense, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY), dense, gradients)
    corrected = _params()
    _train(
        MomentumCorrectedSGD(corrected, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
        corrected,
        gradients,
        [torch.zeros_like(p) for p in corrected],
    )
    for a, b in zip(corrected, dense):
        torch.testing.assert_close(a, b)
    # Plain SGD after the hook's momentum gives the weight decay none: a different model.
    plain = _params()
    _train(
        torch.optim.SGD(plain, lr=LR, weight_decay=WEIGHT_DECAY), plain, gradients, [torch.zeros_like(p) for p in plain]
    )
    assert max(float((a - b).detach().abs().max()) for a, b in zip(plain, dense)) > 1e-3


def test_a_resumed_optimizer_continues_exactly():
    gradients = _gradients(6)
    whole = _params()
    _train(MomentumCorrectedSGD(whole, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY), whole, gradients)
    first = _params()
    optimizer = MomentumCorrectedSGD(first, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    _train(optimizer, first, gradients[:3])
    saved, weights = copy.deepcopy(optimizer.state_dict()), [p.detach().clone() for p in first]
    resumed = [torch.nn.Parameter(w) for w in weights]
    optimizer = MomentumCorrectedSGD(resumed, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    optimizer.load_state_dict(saved)
    _train(optimizer, resumed, gradients[3:])
    for a, b in zip(resumed, whole):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"lr": -1.0, "momentum": 0.9}, "lr: got -1.0; allowed: a number >= 0"),
        ({"lr": 0.1, "momentum": 0.0}, "momentum: got 0.0; allowed: a number in (0, 1), the hook's momentum"),
        ({"lr": 0.1, "momentum": 0.9, "weight_decay": -0.1}, "weight_decay: got -0.1; allowed: a number >= 0"),
    ],
)
def test_bad_settings_name_the_value_and_what_is_allowed(keys, message):
    with pytest.raises(ValueError) as error:
        MomentumCorrectedSGD(_params(), **keys)
    assert str(error.value) == message


def test_momentum_correction_accepts_only_optimizers_that_apply_its_momentum_once():
    params = _params()
    state = TopKState(ratio=0.01, momentum=0.9)
    state.check_optimizer(MomentumCorrectedSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4))
    state.check_optimizer(torch.optim.SGD(params, lr=0.1))
    wrong = [
        (torch.optim.SGD(params, lr=0.1, momentum=0.9), "SGD with momentum 0.9, weight_decay 0"),
        (torch.optim.SGD(params, lr=0.1, weight_decay=1e-4), "SGD with momentum 0, weight_decay 0.0001"),
        (
            MomentumCorrectedSGD(params, lr=0.1, momentum=0.5),
            "MomentumCorrectedSGD with momentum 0.5, weight_decay 0.0",
        ),
        (torch.optim.AdamW(params), "AdamW with momentum None, weight_decay 0.01"),
    ]
    for optimizer, got in wrong:
        with pytest.raises(ValueError, match="needs raytopk.MomentumCorrectedSGD with momentum=0.9") as error:
            state.check_optimizer(optimizer)
        assert str(error.value).endswith("got " + got)
    TopKState(ratio=0.01).check_optimizer(torch.optim.AdamW(params))  # without momentum correction, any optimizer
