"""--index_softmax level|trie: the loss on an index token is a softmax over a subset of the codes.

Constrained decoding only ever chooses among the codes of one level (``<b_*>`` after ``<a_*>``),
so the full-vocabulary softmax spends its gradient on a question the trie already answers
("is the next token an index token of level b?") and on pushing down ~50k text rows. Restricted
to the level's codes, every gradient step ranks items against items, and the output layer runs
on 256 rows instead of the whole vocabulary. ``trie`` goes one step further and normalises over
the codes that can follow the item's earlier tokens, which is the distribution constrained
decoding samples from. Targets that are not index tokens (EOS, the titles of index2item) keep the
full softmax. Off by default: the original trains with the plain loss.

--loss_temperature tau: LETTER's ranking-guided generation loss (Bao et al., CIKM 2024): every
softmax of the loss runs on its scores divided by tau, so that tau < 1 sharpens it and the gradient
goes mostly to the negatives scored close to the target (the hard ones). ``full`` mode is that loss
over the whole vocabulary, for a run without --index_softmax. tau = 1 is the plain loss.

--teacher_weight w (trie mode): each index token's loss mixes in the cross-entropy of a teacher's
distribution over the same children (item_teacher.py: the training parts' item co-occurrence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

IGNORE_INDEX = -100


class IndexSoftmax:
    """Summed cross-entropy of hidden states against labels, index targets over a subset of codes.

    ``trie`` is the item_trie.IndexTrie of the items' token ids; its ``level_tokens`` (the codes used at
    each position) are the levels, so the loss and the level-softmax scoring of the beam search
    share one definition. ``level``: over the codes of the target's level. ``trie``: over the
    codes the trie allows after the target's prefix within its item (the tokens before it in the
    sequence), so that the four tokens of an item add up to the log-probability of the item among
    all items, exactly the choice constrained beam search makes; the model never has to learn
    which code combinations exist. A prefix that is no item's (cannot happen for the project's
    prompts) falls back to the level softmax. ``full``: every target over the whole vocabulary
    (``trie`` may then be None), the model's own loss, here so that a temperature can apply to it.

    ``temperature``: every softmax runs on its scores divided by it (LETTER's ranking-guided loss).
    With ``--index_prior`` the scores are the network's logits plus the prior, and both are divided:
    test.py ranks with those same scores at temperature 1, so each step's ranking at test time is the
    one trained, as in LETTER (whose beam search also uses the plain softmax); dividing the logits
    alone would weigh the prior more at test time than in training.
    """

    def __init__(self, trie, vocab_size: int, mode: str = "level", temperature: float = 1.0,
                 teacher=None, teacher_weight: float = 0.0):
        if mode not in ("level", "trie", "full"):
            raise ValueError(f"mode must be 'level', 'trie' or 'full', got {mode!r}")
        if not (0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if teacher is not None and (mode != "trie" or not 0 <= teacher_weight <= 1):
            raise ValueError(f"a teacher needs the trie mode and a weight in [0, 1], got {mode!r}, {teacher_weight!r}")
        self.mode, self.trie, self.temperature = mode, trie, temperature
        self.teacher, self.teacher_weight = teacher, float(teacher_weight)  # item_teacher.CooccurrenceTeacher
        self.level_of = torch.full((vocab_size,), -1, dtype=torch.long)  # [V] level of each token, -1: text
        self.slot_of = torch.zeros(vocab_size, dtype=torch.long)  # [V] position among its level's codes
        for level, ids in enumerate(self.level_ids):
            self.level_of[ids] = level
            self.slot_of[ids] = torch.arange(len(ids))

    @property
    def level_ids(self) -> list[torch.Tensor]:
        """[codes of level l] token ids: the trie's own lists, so they move with it (no second copy);
        none in ``full`` mode."""
        return [] if self.mode == "full" else self.trie.level_tokens

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear,
                 input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, H] (final, normed), labels [B, T] (unshifted), input_ids [B, T] (trie mode)
        -> summed loss (scalar)."""
        device = labels.device
        self.to(device)
        level_of, slot_of = self.level_of, self.slot_of
        target = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
        keep = target != IGNORE_INDEX
        level = torch.where(keep, level_of[target.clamp(min=0)], -2)  # [B, T-1]; -2: not in the loss
        total = hidden.new_zeros((), dtype=torch.float32)
        text = level == -1
        if text.any():
            logits = head(hidden[:, :-1][text]).float() / self.temperature
            total = total + F.cross_entropy(logits, target[text], reduction="sum")
        # every level's head rows in one gather: each gather of a weight's rows gives it a dense [V, H]
        # gradient in backward (114 MB for SmolLM2, mostly zeros to write), so one gather, not one a level
        level_ids = self.level_ids
        weights = head.weight[torch.cat(level_ids)].split([len(ids) for ids in level_ids]) if level_ids else []
        teacher_of, q = self.teacher.targets(input_ids, level_of) if self.teacher is not None else (None, None)
        for lv, ids in enumerate(level_ids):
            rows, cols = (level == lv).nonzero(as_tuple=True)  # target token at column cols + 1
            if len(rows) == 0:
                continue
            logits = hidden[rows, cols] @ weights[lv].T  # [n, codes of the level]
            if head.bias is not None:
                logits = logits + head.bias[ids]
            logits, y = logits.float(), slot_of[target[rows, cols]]
            if self.mode == "trie":
                logits, y, state = self.within_trie(logits, y, input_ids, rows, cols + 1, lv, slot_of)
            if teacher_of is None:
                total = total + F.cross_entropy(logits / self.temperature, y, reduction="sum")  # after the prior
                continue
            logp = (logits / self.temperature).log_softmax(-1)  # [n, children]
            hard = -logp.gather(1, y[:, None])[:, 0]  # [n]
            start = cols + 1 - lv  # where the target's item starts; before the row's first column: cut, no teacher
            taught = torch.where(start >= 0, teacher_of[rows, start.clamp(min=0)], -1)  # [n] teacher row, -1: none
            has = (taught >= 0) & (state != self.trie.DEAD)
            if has.any():  # the teacher's mass over the same children of the true prefix
                p = self.teacher.children(q[taught[has]], state[has], lv)  # [h, max_children]
                soft = -(p * logp[has][:, :p.shape[1]].masked_fill(p == 0, 0.0)).sum(1)
                hard = hard.clone()
                hard[has] = (1 - self.teacher_weight) * hard[has] + self.teacher_weight * soft
            total = total + hard.sum()
        return total

    def to(self, device: torch.device) -> "IndexSoftmax":
        """Moves the lookup tables (and the trie) to ``device`` once, not at every step."""
        if self.level_of.device != torch.device(device):
            self.level_of, self.slot_of = self.level_of.to(device), self.slot_of.to(device)
            if self.trie is not None:
                self.trie.to(device)
        return self

    def within_trie(self, logits, y, input_ids, rows, cols, lv: int, slot_of):
        """Level logits [n, codes] -> logits over the trie's children of each prefix [n, max_children]
        (padding at -inf), the target's position among them, and each prefix's trie state [n]."""
        if input_ids is None:
            raise ValueError("the trie softmax needs the input ids (the prefix of each target)")
        prefix = torch.stack([input_ids[rows, cols - lv + k] for k in range(lv)], 1) if lv else \
            input_ids.new_empty((len(rows), 0))  # [n, lv]
        trie = self.trie
        state = trie.states(prefix)  # [n]
        allowed = trie.allowed[state]  # [n, max_children] token ids
        real = torch.arange(allowed.shape[1], device=allowed.device) < trie.num_children[state][:, None]
        target = self.level_ids[lv][y]  # [n] token ids
        hit = (allowed == target[:, None]) & real
        found = hit.any(1)
        children = logits.gather(1, slot_of[allowed])  # [n, max_children]
        if trie.log_prior is not None:  # --index_prior: the model learns a residual on the popularity prior
            children = children + trie.log_prior[state]
        children = children.masked_fill(~real, float("-inf"))
        if bool(found.all()):
            return children, hit.float().argmax(1), state
        # an unknown prefix: that row keeps the level softmax (both padded to one width with -inf)
        width = max(children.shape[1], logits.shape[1])
        children = F.pad(children, (0, width - children.shape[1]), value=float("-inf"))
        logits = F.pad(logits, (0, width - logits.shape[1]), value=float("-inf"))
        return (torch.where(found[:, None], children, logits), torch.where(found, hit.float().argmax(1), y),
                torch.where(found, state, trie.DEAD))


class IndexSoftmaxTrainer(Trainer):
    """A Trainer whose loss is :class:`IndexSoftmax`, normalised exactly as the default loss is: per
    micro-batch when ``model_accepts_loss_kwargs`` is off (finetune.py --loss_normalization micro_batch),
    else over the label tokens of the whole accumulated batch (global_tokens)."""

    def __init__(self, *args, index_softmax: IndexSoftmax, **kwargs):
        super().__init__(*args, **kwargs)
        self.index_softmax = index_softmax

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        keep = inputs.pop("logits_to_keep", 0)
        # through the (DDP) wrapper so gradients synchronise; one projected position is all it costs
        outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = outputs.hidden_states[-1]  # [B, T, H], after the final norm
        if keep:
            hidden = hidden[:, -keep:]  # the columns the left-padded labels cover
        unwrapped = self.accelerator.unwrap_model(model)
        input_ids = inputs["input_ids"][:, -keep:] if keep else inputs["input_ids"]
        total = self.index_softmax(hidden, labels, unwrapped.get_output_embeddings(), input_ids)
        if num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            # a mean over this micro-batch's labels; the Trainer then divides by the accumulation steps
            loss = total / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        else:  # mirrors the default: the sum over the global label count, times the processes averaged over
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
