"""A Hugging Face causal language model as it is: a tiny GPT-2, randomly initialised (nothing is downloaded).

    pip install "backward-lab[examples]"        # transformers, an optional extra
    python -m runner.experiments.examples.stdlib_corpus stdlib.txt
    python -m runner -m experiment=tokens model=custom \\
        model._target_=runner.experiments.examples.gpt2_tiny.tiny_gpt2 model.vocab=256 \\
        data=text data.path=stdlib.txt trainer.steps=30 optim.lr=0.1

On Python 3.11's docstrings (1876 paragraphs of up to 64 bytes) all four claims of experiment=tokens hold
(the question of torchtune PR #1875 and transformers PRs #34191, #34198): normalize=tokens ends within
2.4e-7 of full at k = 2, 4, 8, normalize=micro_batch differs (|dθ| >= 4.9e-4) at a negligible cost in loss.
At lr=0.1 the held-out token accuracy is 0.157 in every run after 30 steps (the most frequent bytes); at the
default optim.lr=0.5 the model learns more and micro_batch's cost becomes visible (+9.8σ of seed noise in
final loss at k=2), while normalize=tokens, whose first gradient is still within 9e-8 of full's, drifts past
float32 tolerance (up to 3e-4) in 30 steps.

GPT2LMHeadModel takes a GPT2Config, not keyword arguments, so `model._target_` names this factory.
Its output is a CausalLMOutputWithCrossAttentions (a ModelOutput, a mapping): the runner hands loss=lm
its `logits` and says so in the summary (outputs_from: logits). It takes input_ids of shape (B, T), as
data=seq and data=text give them: right-padded with 0, with no attention mask. Causal attention keeps a
real token from seeing the padding after it, and the padded positions' labels are -100, so the loss is
the one an attention mask would give.
"""
from torch import nn


def tiny_gpt2(vocab: int = 16, n_embd: int = 32, n_layer: int = 1, n_head: int = 2, n_positions: int = 256,
              dropout: float = 0.0) -> nn.Module:
    """GPT2LMHeadModel(GPT2Config(...)). `vocab` is the runner's model.vocab, passed only where it differs
    from the runner's default, so its default is the runner's 16 (data=text's bytes need model.vocab=256);
    the rest keep GPT2Config's names (+model.n_embd=64). Dropout is off by default, so that micro-batches
    can give the full batch's gradient (with dropout on, the runner's probe reports the run as stochastic)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False,
                        bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside a small vocabulary
    return GPT2LMHeadModel(config)
