"""Text embeddings as FastChat's model worker makes them: the language model's last hidden states,
mean-pooled over the tokens, L2-normalised."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llava_serve.models.base import LoadedModel


@torch.inference_mode()
def pooled_embeddings(lm: LoadedModel, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
    """One unit vector per input. Inputs run one at a time: no padding, so no mask to get wrong."""
    rows = []
    for ids in token_ids:
        input_ids = torch.tensor([list(ids)], device=lm.device)
        out = lm.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        rows.append(out.hidden_states[-1][0].float().mean(dim=0))
    return torch.nn.functional.normalize(torch.stack(rows), p=2, dim=1).tolist()
