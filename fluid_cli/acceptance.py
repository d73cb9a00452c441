"""Which drafted tokens a verify forward keeps: the greedy rule and the speculative-sampling rule, as pure functions.

A block is `[s_0, d_1, .., d_{k-1}]`: slot 0 is the model's own choice (argmax, or a sample of `p`), the drafts
come from the mask rows of an earlier forward. The verify forward feeds the block as ordinary tokens; its row `j`
gives `p_{j+1}`, the model's next-token distribution after `s_0 .. d_j`, and each row *chooses* the token it would
commit there. The block keeps its drafts while each equals its row's choice; the first one that does not is
replaced by the choice, and the block ends (`accepted_length`).

- **Greedy** (`temperature = 0`): a row's choice is the argmax of its logits. So every committed token is the
  greedy token given its prefix.
- **Sampling** (Leviathan et al. 2023, Chen et al. 2023): with `p` and `q_j` the warped distributions of the
  verifying row and of the mask row that drafted `d_j` (`d_j ~ q_j`, with its own noise), the row keeps `d_j` when
  `u < p(d_j) / q_j(d_j)`; otherwise it chooses a sample of `normalize(max(0, p - q_j))`, which never equals `d_j`.
  A kept draft is then distributed as `p` given its prefix, exactly, whatever `q_j` is: so every committed token
  follows the model's own (warped) distribution, as if no drafting had happened. This holds as long as the number
  of drafts in the block (the horizon) was chosen without looking at the drafted values.

Warping is HF `generate`'s order: temperature, then top-k, then top-p, in float32; `p` and `q` are warped alike, and
the `q` a draft is sampled from is the `q` its ratio uses (`draft` returns both).

Worked example, one row, a vocabulary of three tokens: the draft (token 0) is twice as likely under `q` as under
`p`, so it is kept with probability 1/2 (here `u = 0.6`: rejected), and the residual puts all its mass on token 1:

    >>> p, q = torch.tensor([[0.3, 0.5, 0.2]]), torch.tensor([[0.6, 0.2, 0.2]])
    >>> residual(p, q)
    tensor([[0., 1., 0.]])
    >>> choose(p, q, torch.tensor([0]), torch.tensor([0.6]), torch.tensor([0.1])).tolist()
    [1]
    >>> choose(p, q, torch.tensor([0]), torch.tensor([0.4]), torch.tensor([0.1])).tolist()
    [0]
    >>> accepted_length([7, 3, 4, 5], [3, 9, 1])  # slot 2 drafted 4, its row chose 9: keep 2, commit 9 after them
    2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from fluid_cli.errors import FluidError


@dataclass(frozen=True)
class Sampling:
    """How a request picks its tokens: `temperature = 0` is greedy decoding (the other fields unused)."""

    temperature: float = 0.0
    top_p: float = 1.0  # keep the most likely tokens whose mass reaches top_p (1: all)
    top_k: int = 0  # keep the top_k most likely tokens (0: all)
    seed: int | None = None  # the request's own random stream (None: drawn from the operating system)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def problem(self) -> tuple[str, str] | None:
        """The first field whose value has no meaning, with what is wrong (None: all fine).

            >>> Sampling(0.7, top_p=1.5).problem()
            ('top_p', 'top_p = 1.5: must be in (0, 1] (1 keeps every token)')
        """
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # also NaN
            return "temperature", f"temperature = {self.temperature}: must be 0 (greedy) or a positive number"
        if not 0 < self.top_p <= 1:
            return "top_p", f"top_p = {self.top_p}: must be in (0, 1] (1 keeps every token)"
        if self.top_k < 0:
            return "top_k", f"top_k = {self.top_k}: must be 0 (every token) or more"
        if self.seed is not None and not 0 <= self.seed < 2**63:
            return "seed", f"seed = {self.seed}: must be between 0 and 2**63 - 1"
        return None

    def check(self, where: str = "") -> None:
        """A one-line error for a value that has no meaning (`where` prefixes it, e.g. a flag's name)."""
        if (problem := self.problem()) is not None:
            raise FluidError(f"{where}: {problem[1]}" if where else problem[1])

    def nth(self, i: int) -> Sampling:
        """The settings of the `i`-th request of a run seeded with `seed`: its own stream, `seed + i`."""
        return replace(self, seed=(self.seed + i) % 2**63)

    def to_dict(self) -> dict[str, float | int | None]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed}


GREEDY = Sampling()


# --------------------------------------------------------------------------------------------- greedy and both


def accepted_length(block: list[int], choices: list[int]) -> int:
    """How many slots of `block` verification keeps: slot 0 always, then each draft `block[j + 1]` while it equals
    `choices[j]` (its verifying row's choice). Greedy and sampled decoding share this rule; they differ only in how
    a row chooses (`choose`).

    >>> accepted_length([5, 6, 7], [6, 7]), accepted_length([5, 6, 7], [8, 7])
    (3, 1)
    """
    n = len(block) - 1
    return 1 + next((j for j, c in enumerate(choices[:n]) if block[j + 1] != c), n)


# --------------------------------------------------------------------------------------------- sampling


def warp(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities of `logits` `[n, V]` under each row's temperature, top-k and top-p (in that order,
    as HF `generate`), in float32 (`temperature` best in float64, on the host: float32 rounds 1e-300 to 0). Top-p
    keeps a token while the mass of the more likely kept tokens is below `top_p` (so at least one token survives);
    `top_k = 0` and `top_p = 1` keep everything.

    >>> logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)
    >>> one = lambda x: torch.tensor([x])
    >>> warp(logits, one(1.0), one(2), one(1.0)).numpy().round(3)
    array([[0.731, 0.269, 0.   , 0.   ]], dtype=float32)
    >>> warp(logits, one(1.0), one(0), one(0.5)).numpy().round(3)  # the first token holds 0.64 of the mass
    array([[1., 0., 0., 0.]], dtype=float32)
    """
    # Shifted by the row's maximum, scaled by 1/temperature computed in float64 and held within float32's range: a
    # temperature that float32 rounds to 0 (below ~1e-45) or to infinity (above ~3e38), or a quotient past its
    # range, would otherwise give NaN (0/0, inf/inf, inf - inf) to the softmax, and `sample` would draw the last
    # token of the vocabulary. Shifted, every z is <= 0 and the best token's exactly 0, so a tiny temperature is
    # greedy decoding and a huge one uniform, as the limits are; the shift leaves the softmax as it is. (float64
    # on the host: an MPS device has none.)
    finfo = torch.finfo(torch.float32)
    x = logits.float()
    inverse = temperature.cpu().double().reciprocal().clamp(finfo.tiny, finfo.max).float().to(x.device)
    z = (x - x.max(-1, keepdim=True).values) * inverse[:, None]
    need_k, need_p = bool((top_k > 0).any()), bool((top_p < 1).any())  # each step costs: only where asked
    if not (need_k or need_p):
        return z.softmax(-1)
    sorted_z, order = z.sort(-1, descending=True)
    if need_k:
        k = top_k.to(z.device)[:, None]
        sorted_z = sorted_z.masked_fill((k > 0) & (torch.arange(z.shape[-1], device=z.device) >= k), -math.inf)
    probs = sorted_z.softmax(-1)
    if need_p:
        before = probs.cumsum(-1) - probs  # the mass of the more likely tokens
        p = top_p.float().to(z.device)[:, None]
        probs = probs.masked_fill((before >= p) & (p < 1), 0.0)  # top-p 1 keeps all, whatever the sums' rounding
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` `[n, V]` by inverting its cumulative distribution at `u` `[n]` (uniform in
    [0, 1)): token `i` is drawn with probability `probs[i] / sum(probs)`, a zero-probability token never.

    >>> sample(torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 3), torch.tensor([0.0, 0.49, 0.51])).tolist()
    [1, 1, 3]
    """
    cdf = probs.double().cumsum(-1)
    target = u.double().to(cdf.device)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


def draft(q: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft tokens from the mask rows' warped distributions `q` `[n, V]`: the tokens, and the distributions their
    acceptance ratios must use (the very ones they were drawn from)."""
    return sample(q, u), q


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`normalize(max(0, p - q))`, the distribution a rejected draft's row samples from; where rounding leaves it no
    mass (`p` equal to `q`, when no draft is ever rejected), `p` itself."""
    r = (p - q).clamp_min(0.0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(torch.finfo(r.dtype).tiny), p)


def choose(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
           u_residual: torch.Tensor) -> torch.Tensor:
    """The token each verifying row commits (`[n]`): its draft `drafts[i] ~ q[i]` when `u_accept[i] < p(d) / q(d)`,
    else a sample of `residual(p, q)` at `u_residual[i]`. `p[i]` is the distribution of the row that verifies
    `drafts[i]`, `q[i]` the one the draft was drawn from."""
    d = drafts.to(p.device)[:, None]
    p_d, q_d = p.gather(-1, d)[:, 0], q.gather(-1, d)[:, 0]
    keep = u_accept.to(p.device) * q_d < p_d  # u < p/q without dividing (q_d > 0: d was drawn from q)
    return torch.where(keep, drafts.to(p.device), sample(residual(p, q), u_residual))
