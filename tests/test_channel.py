"""The latent channel carries what the first agent knows: change the fact in its notes, and its
thoughts and the answerer's logits change (tiny-random system; the bundled one is in test_bundled)."""

import torch

from .probes import relay_probe

QUESTION = "Your teammate was told a secret number. What is the secret number?"
NOTES = ["The secret number is 33.", "The secret number is 71."]


def test_changing_the_fact_changes_thoughts_and_receiver_logits(tiny_system):
    thoughts, logits = relay_probe(tiny_system, QUESTION, NOTES, steps=4)
    assert (thoughts[0] - thoughts[1]).abs().max() > 1e-3
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_a_channel_that_carries_nothing_fails_the_probe(tiny_system):
    """Control: with the planner -> critic link sending a constant, the answerer cannot tell the facts
    apart, so the probe above really measures the channel."""
    link = tiny_system.links["outer"]["planner->critic"]
    saved = {k: v.clone() for k, v in link.state_dict().items()}
    try:
        with torch.no_grad():
            for p in link.parameters():
                p.zero_()
        thoughts, logits = relay_probe(tiny_system, QUESTION, NOTES, steps=4)
        assert (thoughts[0] - thoughts[1]).abs().max() > 1e-3  # the planner still knows
        torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)  # nobody downstream does
    finally:
        link.load_state_dict(saved)
