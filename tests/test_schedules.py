import pytest
import torch

from dlm.schedules import SCHEDULES, get_schedule

NAMES = SCHEDULES.names()


def test_all_four_schedules_registered():
    assert set(NAMES) == {"loglinear", "linear", "cosine", "geometric"}


@pytest.mark.parametrize("name", NAMES)
def test_ends_are_exact(name):
    s = get_schedule(name)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a = s.alpha(t)
    assert a[0].item() == 1.0
    assert a[1].item() == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_alpha_decreasing(name):
    s = get_schedule(name)
    a = s.alpha(torch.linspace(0, 1, 1001, dtype=torch.float64))
    assert torch.all(a[1:] <= a[:-1])


@pytest.mark.parametrize("name", NAMES)
def test_derivative_matches_finite_difference(name):
    s = get_schedule(name)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(s.alpha_prime(t), fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_nelbo_weight_matches_finite_difference(name):
    """weight(t) = −α'(t)/(1 − α(t)), α' taken numerically."""
    s = get_schedule(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    fd = -(s.alpha(t + h) - s.alpha(t - h)) / (2 * h) / (1 - s.alpha(t))
    torch.testing.assert_close(s.weight(t), fd, rtol=1e-5, atol=1e-7)


def test_loglinear_weight_is_one_over_t():
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(get_schedule("loglinear").weight(t), 1 / t)
