"""The removal audit passes a policy that honours camera removal and stops one that does not."""

import numpy as np
import pytest

from eqx_pi05.eval.audit import RemovalAuditError, audit_removal
from eqx_pi05.cameras import CAMERAS
from eqx_pi05.eval.rollout import policy_observation
from eqx_pi05.eval.sim import SimObservation


def _observation():
    rng = np.random.default_rng(0)
    obs = SimObservation(agentview=rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                         wrist=rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), state=rng.normal(size=8))
    return policy_observation(obs, "pick up the black bowl", seed=123)


def _policy(removed=(), reads_removed=False):
    """Actions from the image means and the state; `removed` cameras are zeroed first (as the model's
    transform chain does), unless the policy is `reads_removed` (the bug the audit exists for)."""

    def policy(observations):
        out = []
        for obs in observations:
            feats = [obs["observation/state"].sum()]
            for camera, key in ((c, n.client_key) for c, n in CAMERAS.items()):
                image = obs[key].astype(np.float64)
                if camera in removed and not reads_removed:
                    image = np.zeros_like(image)
                feats.append(image.mean())
            noise = np.random.default_rng(obs["noise_seed"]).normal(size=(10, 7))
            out.append(noise + np.tanh(np.sum(feats) / 100.0))
        return np.stack(out)

    return policy


def test_audit_passes_a_policy_that_does_not_read_the_removed_camera():
    line = audit_removal(_policy(removed=("agentview",)), _observation(), {"agentview": 1.0}, {})
    assert line == "eval physical view-removal {agentview=1} audit=pass"


def test_audit_fails_loudly_for_a_policy_that_reads_the_removed_camera():
    with pytest.raises(RemovalAuditError, match=r"audit=FAIL.*\['agentview'\]"):
        audit_removal(_policy(removed=("agentview",), reads_removed=True), _observation(), {"agentview": 1.0}, {})


def test_audit_fails_for_a_policy_whose_noise_ignores_the_observation_seed():
    rng = np.random.default_rng(0)

    def unseeded(observations):
        return rng.normal(size=(len(observations), 10, 7))

    with pytest.raises(RemovalAuditError, match="not deterministic"):
        audit_removal(unseeded, _observation(), {"agentview": 1.0}, {})


def test_view_dropout_variant_logs_its_train_only_mechanism_instead_of_auditing():
    calls = []
    line = audit_removal(lambda obs: calls.append(obs), _observation(), {"agentview": 0.0}, {"agentview": 1.0})
    assert line.startswith("eval view_dropout (zeros) {agentview=1} is train-only") and not calls


def test_no_removal_is_said_plainly():
    assert audit_removal(_policy(), _observation(), {}, {}) == "eval no camera removal: every camera reaches the policy"


def test_unknown_camera_name_is_an_error_naming_the_known_ones():
    with pytest.raises(ValueError, match="'base'.*agentview"):
        audit_removal(_policy(), _observation(), {"base": 1.0}, {})
