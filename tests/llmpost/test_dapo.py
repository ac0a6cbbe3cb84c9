"""DAPO's functions against values computed by hand."""

import math

import pytest
import torch

from llmpost.dapo import (
    SampledGroup,
    clipped_tokens,
    dynamic_sample,
    group_advantages,
    overlong_penalty,
    policy_loss,
)


def test_group_advantages_hand_values():
    # group 1: [1, 0, 0, 1] -> mean 0.5, unbiased std sqrt(1/3)
    # group 2: all equal -> all zero
    # group 3: [0, 0, 0, 3] -> mean 0.75, unbiased std sqrt((3*0.5625 + 5.0625)/3) = 1.5
    rewards = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2, 0, 0, 0, 3])
    adv = group_advantages(rewards, 4)
    s1 = math.sqrt(1 / 3)
    expected = [
        0.5 / (s1 + 1e-6), -0.5 / (s1 + 1e-6), -0.5 / (s1 + 1e-6), 0.5 / (s1 + 1e-6),
        0.0, 0.0, 0.0, 0.0,
        -0.75 / (1.5 + 1e-6), -0.75 / (1.5 + 1e-6), -0.75 / (1.5 + 1e-6), 2.25 / (1.5 + 1e-6),
    ]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_group_advantages_rejects_bad_shape():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(7), 4)


def test_policy_loss_hand_values():
    # Two sequences, three token slots; the last slot of seq 2 is padding.
    old = torch.zeros(2, 3)
    # ratios: seq 1: [1.5, 1.1, 0.5], seq 2: [0.7, 1.0, (pad) 9.0]
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5], [0.7, 1.0, 9.0]]))
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # seq 1, A=2: -min(rA, clip(r, .8, 1.28) A): r=1.5 -> -min(3, 2.56) = -2.56;
    #   r=1.1 -> -2.2; r=0.5 -> -min(1.0, 1.6) = -1.0
    # seq 2, A=-1: r=0.7 -> -min(-0.7, -0.8) = 0.8; r=1.0 -> 1.0
    expected = (-2.56 - 2.2 - 1.0 + 0.8 + 1.0) / 5
    loss = policy_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Token-level: the same tokens in one long sequence weigh the same as in short ones,
    # and a different denominator is honoured.
    loss_n = policy_loss(logp, old, adv, mask, num_tokens=10)
    assert loss_n.item() == pytest.approx(expected * 5 / 10, rel=1e-6)


def test_policy_loss_dual_clip():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[5.0, 2.0]]))
    adv = torch.tensor([-1.0])
    mask = torch.ones(1, 2)
    # Without dual clip: -min(-5, -1.28) = 5 and -min(-2, -1.28) = 2.
    assert policy_loss(logp, old, adv, mask).item() == pytest.approx(3.5, rel=1e-6)
    # Dual clip c=3 caps each at -c A = 3: [3, 2].
    assert policy_loss(logp, old, adv, mask, dual_clip=3.0).item() == pytest.approx(2.5, rel=1e-6)


def test_policy_loss_gradient_is_zero_on_clipped_tokens():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)
    policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2)).backward()
    # token 1 clipped (r=1.5 > 1.28, A>0): no gradient; token 2: d(-r)/dlogp / 2 = -1.1/2
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.55]]))
    clipped = clipped_tokens(logp.detach(), old, torch.tensor([1.0]))
    assert clipped.tolist() == [[True, False]]


def test_overlong_penalty_inside_and_past_buffer():
    lengths = torch.tensor([10, 12, 14, 16, 18, 20])
    # max_len 20, buffer 8 -> penalty starts after 12: (L-12)/8
    pen = overlong_penalty(lengths, max_len=20, buffer_len=8, factor=0.5)
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -0.75, -1.0]) * 0.5
    torch.testing.assert_close(pen, expected)
    assert overlong_penalty(lengths, 20, 0, 1.0).abs().sum() == 0


def _groups(reward_lists):
    return [SampledGroup(list(r), data=i) for i, r in enumerate(reward_lists)]


def test_groups_with_all_equal_rewards_are_not_informative():
    groups = _groups([[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.2, 0.5]])
    assert [g.data for g in groups if g.informative] == [1, 3]


def test_dynamic_sampling_fills_the_batch():
    rounds = [
        _groups([[1, 1], [0, 1], [0, 0]]),  # 1 informative
        _groups([[0, 0], [1, 0]]),  # 1 more
        _groups([[0, 1], [1, 0]]),  # 2 more, only 1 needed
    ]
    calls = []

    def sample_round(i):
        calls.append(i)
        return rounds[i]

    result = dynamic_sample(sample_round, num_groups=3, max_extra_rounds=5)
    assert calls == [0, 1, 2]
    assert len(result.groups) == 3 and all(g.informative for g in result.groups)
    assert not result.cap_hit
    assert result.generated_groups == 7
    assert result.kept_share == pytest.approx(3 / 7)


def test_dynamic_sampling_stops_at_cap(caplog):
    calls = []

    def sample_round(i):
        calls.append(i)
        return _groups([[1, 1], [0, 0]] if i else [[0, 1], [1, 1]])

    with caplog.at_level("WARNING"):
        result = dynamic_sample(sample_round, num_groups=4, max_extra_rounds=2)
    assert calls == [0, 1, 2]  # one normal round + two extra
    assert result.cap_hit and len(result.groups) == 1
    assert "cap of 2 extra rounds hit with 1 of 4" in caplog.text


def test_kl_k3_hand_values():
    from llmpost.dapo import kl_k3

    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.2]]))
    # d = log(0.25 / 0.5) = -log 2: exp(d) - d - 1 = 0.5 + log 2 - 1; equal probs -> 0
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([[math.log(2) - 0.5, 0.0]]))
