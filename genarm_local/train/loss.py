"""The GenARM loss and the batches it is computed on (torch, imported by the functions that use it).

The loss (Xu et al. 2025, "GenARM: Reward Guided Generation with Autoregressive Reward Model for Test-time
Alignment", ICLR 2025, §4) trains an autoregressive reward model π_r whose summed token log-probabilities are the
reward, with no reference model:

    L = − log σ( β · ( log π_r(y_w|x) − log π_r(y_l|x) ) − γ ),   log π_r(y|x) = Σ_t log π_r(y_t | x, y_<t)

summed over response tokens only. Two additions keep an ARM trained on a small, easy preference set from
overshooting (bench/train_experiments.py measures them; README, "Your own preference"): conservative label smoothing
in ``genarm_loss`` and a likelihood anchor on chosen responses (``anchor_penalty``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .data import TokenizedPair


def genarm_loss(chosen_logps, rejected_logps, beta: float = 0.05, gamma: float = 0.0, label_smoothing: float = 0.0):
    """Per-pair GenARM loss −log σ(z), z = β·(log π(y_w|x) − log π(y_l|x)) − γ (see the module docstring), with
    conservative label smoothing ε: −(1−ε)·log σ(z) − ε·log σ(−z) (cDPO; Mitchell 2023, "A note on DPO with noisy
    preferences"). ε = 0 is the paper's loss, lowest only as z → ∞; with ε > 0 it is lowest at the finite margin
    z* = log((1−ε)/ε), so steps past saturation stop inflating the ARM's scale.

    ``chosen_logps`` and ``rejected_logps`` are summed response log-probabilities, shape [B]. Returns shape [B].
    """
    import torch.nn.functional as F

    z = beta * (chosen_logps - rejected_logps) - gamma
    if label_smoothing == 0:
        return -F.logsigmoid(z)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def anchor_penalty(chosen_logps, chosen_tokens, base_logps=None, margin: float = 0.0):
    """Per-pair anchor on the chosen response: its negative log-likelihood per token, −log π_r(y_w|x) / |y_w| (the
    NLL term of RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization"); with ``base_logps``
    (log π_base(y_w|x)), only how far it falls below the base's + ``margin`` nats per token,
    max(0, (log π_base(y_w|x) − log π_r(y_w|x)) / |y_w| + margin) (at margin 0 the hinge of DPO-Positive, Pal et al.
    2024, "Smaug").

    The preference loss sees only the difference between chosen and rejected. When they share most tokens, the
    cheapest way to widen it lowers both, moving the ARM's probability mass onto tokens neither response uses: the
    ARM stops being a language model of the responses, and guided text drifts where no response went. A small
    likelihood term on the chosen responses keeps the ARM's mass on them. The plain term also keeps rewarding a
    chosen response's likelihood long after the preference is learned, so a long run memorises the responses'
    wording; the hinge's pull ends at a finite target (the preference term may still move the response past it).
    """
    penalty = -chosen_logps / chosen_tokens
    if base_logps is None:
        return penalty
    return (penalty + base_logps / chosen_tokens + margin).clamp_min(0)


def sequence_logps(token_logits, targets, rows, n_rows: int):
    """Σ over a sequence's response tokens of log softmax(logits)[target]: the summed log π(y|x) of each row.

    Only response tokens are passed in (flattened): ``token_logits[i]`` [V] is the distribution that predicts
    ``targets[i]``, a token of row ``rows[i]``. Prompt and padding positions are never selected (``collate``), so
    they contribute nothing. Returns shape [n_rows].
    """
    import torch

    picked = torch.gather(token_logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(token_logits, -1)
    return torch.zeros(n_rows, dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)


# ---- rows → pairs --------------------------------------------------------------------------------------------


# ---- token ids → one batch of chosen then rejected ---------------------------------------------------------


def collate(pairs: Sequence[TokenizedPair], pad_id: int):
    """One right-padded batch holding every chosen sequence then every rejected one (2B rows, one forward pass).

    Returns (input_ids, attention_mask, predict_mask), all [2B, L]. ``predict_mask[b, t]`` is set where the
    logits at position t predict a response token (t + 1 in the response): the model computes its output layer
    only there (transformers' boolean logits_to_keep), never over prompt or padding positions — with a large
    vocabulary the output layer is most of the cost.
    """
    import torch

    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(prompt) + len(reply) for prompt, reply in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    predict_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        input_ids[i, :n] = torch.tensor(prompt + reply)
        attention_mask[i, :n] = 1
        predict_mask[i, len(prompt) - 1 : n - 1] = True
    return input_ids, attention_mask, predict_mask


def batch_logps(model, input_ids, attention_mask, predict_mask):
    """Summed response log-probabilities of every row of a collated batch under ``model`` (one forward pass)."""
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=predict_mask, use_cache=False
    ).logits
    # Row-major selection: the same order as transformers' hidden_states[predict_mask].
    targets = input_ids[:, 1:][predict_mask[:, :-1]]
    rows = predict_mask.nonzero()[:, 0]
    return sequence_logps(logits.float(), targets, rows, input_ids.shape[0])
