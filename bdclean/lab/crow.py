"""CROW (consistency regularization) baseline: LM loss + α · layer-consistency loss on FGSM-perturbed embeddings.

For one batch:
1. clean forward from the input embeddings e (``output_hidden_states``): response-only LM loss, and the
   consistency loss  C(h) = mean over consecutive pairs (h_l, h_{l+1}) of the hidden-state tuple (embedding output
   through the last layer) of mean over real tokens of 1 − cos(h_l, h_{l+1});
2. ∇_e C (one extra backward, w.r.t. the embeddings only) gives the FGSM perturbation e' = e + ε · sign(∇_e C);
3. perturbed forward from e': C(h') is the consistency term that is trained.

The training objective is LM(e) + α · C(h'), with α = 5.5 and ε = 0.1 by default (CROW paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bdclean.train.chat import Example
from bdclean.train.loop import Step, causal_parts, collate


def consistency(hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over consecutive layer pairs of the token-mean (over ``mask``) of 1 − cos(h_l, h_{l+1})."""
    if len(hidden_states) < 2:
        raise ValueError("need at least two hidden states for a consistency loss")
    m = mask.to(hidden_states[0].dtype)
    denom = m.sum().clamp_min(1)
    terms = []
    for a, b in zip(hidden_states[:-1], hidden_states[1:]):
        cos = F.cosine_similarity(a.float(), b.float(), dim=-1)  # [batch, T]
        terms.append(((1 - cos) * m).sum() / denom)
    return torch.stack(terms).mean()


def crow_losses(model, examples: list[Example], pad_id: int, eps: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(response-only LM loss on clean inputs, consistency loss on FGSM-perturbed inputs) for one batch.

    Both carry gradients for the model's trainable parameters; the embeddings themselves are treated as inputs."""
    decoder, head = causal_parts(model)
    ids, mask, rows, cols = collate(examples, pad_id)
    emb = decoder.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = decoder(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True)
    logits = head(out.last_hidden_state[rows, cols]).float()
    lm = F.cross_entropy(logits, ids[rows, cols + 1])
    clean_cons = consistency(out.hidden_states, mask)
    (grad,) = torch.autograd.grad(clean_cons, emb, retain_graph=True)
    adv = (emb + eps * grad.sign()).detach()
    out_adv = decoder(inputs_embeds=adv, attention_mask=mask, output_hidden_states=True)
    return lm, consistency(out_adv.hidden_states, mask)


def crow_loss(alpha: float = 5.5, eps: float = 0.1):
    """A ``loop.train`` loss function: LM(e) + α · C(h'), reporting both terms."""

    def loss_fn(model, step: Step, pad_id: int) -> tuple[torch.Tensor, dict[str, float]]:
        lm, cons = crow_losses(model, [e for g in step for e in g], pad_id, eps)
        return lm + alpha * cons, {"lm_loss": lm.item(), "consistency_loss": cons.item()}

    return loss_fn
