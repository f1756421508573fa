"""Build Tiffin's tiny LLM: `python -m models.tiny_llm [--force] [--output DIR]`.

No weights can be downloaded here, so the project makes its own: a byte-level BPE tokenizer
trained (with `tokenizers`) on a small generated corpus, and a Llama-architecture model
(mlx-lm's `llama` module, a few hundred thousand parameters) trained on the same corpus with MLX
for a few hundred steps. The result is a standard mlx-lm / Hugging Face model directory
(`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` with a chat
template) saved to the BentoML model store as `tiffin-tiny-llm:v1`.

`python -m models.tiny_llm --bench` makes the bench-size model instead, `tiffin-bench-llm:v2`: the
same tokenizer and architecture, 23M parameters (hidden size 512, 8 layers), random weights (no
training: its text is random tokens, so generations run to their token budget). It exists only
for `make bench-llm`, where compute rather than Python must dominate a decode step; it is never
packaged nor built by `make test`.

Its text is nonsense that merely looks like the corpus; it exists so that every code path of the
LLM runner (streaming, token accounting, constrained decoding, the OpenAI-compatible API) runs for
real in tests and on a fresh machine. A version already in the store is kept unless `--force`.
Everything is seeded: two builds produce the same tokenizer, and weights that differ at most by
floating-point summation order.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import bentoml

NAME = "tiffin-tiny-llm"
VERSION = "v1"
BENCH_NAME = "tiffin-bench-llm"
BENCH_VERSION = "v2"  # v1 was 12.8M parameters (hidden 384); a new recipe is a new version
LABEL_OWNER = "tiffin-llm"  # not "tiffin": the tabular model catalogue only lists ModelCard models
SEED = 20240905

SPECIAL_TOKENS = ("<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
# The same template mlx-lm, transformers and the OpenAI-compatible API apply to chat messages.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "<|{{ message['role'] }}|>\n"
    "{% else %}<|user|>\n{% endif %}"
    "{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the built model; stored as the model's metadata."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 176
    max_position_embeddings: int = 2048
    corpus_documents: int = 2000
    train_steps: int = 120
    batch_size: int = 16
    sequence_length: int = 48
    learning_rate: float = 5e-3
    seed: int = SEED


# A Llama of ~23M parameters left at its random initialisation, for the benchmark only: each
# decode step costs real matrix products (~45 MFLOP a token, 180x the tiny model), yet on this
# project's 2-core CI box (MLX's reference CPU BLAS, ~4-7 GFLOP/s) a run still fits in minutes.
BENCH_RECIPE = Recipe(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=1408,
    train_steps=0,
)


# --- corpus -------------------------------------------------------------------------------------

_SUBJECTS = ("the card", "the merchant", "this transaction", "the account", "the user", "the model")
_VERBS = ("shows", "has", "matches", "exceeds", "follows", "reports", "needs")
_OBJECTS = (
    "a new device",
    "an unusual amount",
    "a high risk merchant",
    "a foreign country",
    "many small payments",
    "a normal pattern",
    "a late night purchase",
    "a known location",
    "a recent chargeback",
)
_WORDS = (
    "risk",
    "fraud",
    "score",
    "review",
    "approve",
    "decline",
    "merchant",
    "amount",
    "velocity",
    "country",
    "device",
    "summary",
    "reason",
    "items",
    "name",
    "value",
    "status",
    "count",
    "total",
    "label",
    "ok",
    "low",
    "medium",
    "high",
    "true",
    "false",
    "null",
)


def _sentence(rng: random.Random) -> str:
    text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.4:
        text += f" and {rng.choice(_OBJECTS)}"
    return text[0].upper() + text[1:] + rng.choice((".", ".", "!", "?"))


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.random()
    if depth < 2 and kind < 0.15:
        return {rng.choice(_WORDS): _json_value(rng, depth + 1) for _ in range(rng.randint(1, 3))}
    if depth < 2 and kind < 0.3:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind < 0.5:
        return rng.randint(-50, 500)
    if kind < 0.65:
        return round(rng.uniform(0, 1), rng.randint(1, 3))
    if kind < 0.75:
        return rng.choice((True, False, None))
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))


def corpus(documents: int, seed: int) -> Iterator[str]:
    """Generated training text: prose, JSON objects and chat turns mixing the two."""
    rng = random.Random(seed)
    for _ in range(documents):
        roll = rng.random()
        if roll < 0.35:
            yield " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
        elif roll < 0.65:
            obj = {rng.choice(_WORDS): _json_value(rng) for _ in range(rng.randint(1, 4))}
            yield json.dumps(obj, separators=(",", ":") if rng.random() < 0.5 else (", ", ": "))
        else:
            obj = {rng.choice(_WORDS): _json_value(rng) for _ in range(rng.randint(1, 3))}
            answer = json.dumps(obj) if rng.random() < 0.6 else _sentence(rng)
            turns = ""
            if rng.random() < 0.3:
                turns += "<|system|>\nReply in JSON.<|end|>\n"
            turns += f"<|user|>\n{_sentence(rng)}<|end|>\n<|assistant|>\n{answer}<|end|>\n"
            yield turns


# --- tokenizer ----------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _tokenizer_config(max_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


# --- model --------------------------------------------------------------------------------------


def _model_config(recipe: Recipe, vocab_size: int, eos_id: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": recipe.hidden_size,
        "num_hidden_layers": recipe.num_hidden_layers,
        "intermediate_size": recipe.intermediate_size,
        "num_attention_heads": recipe.num_attention_heads,
        "num_key_value_heads": recipe.num_key_value_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": recipe.max_position_embeddings,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def train_model(recipe: Recipe, config: dict[str, Any], token_ids: list[int]) -> tuple[Any, float]:
    """Next-token training on the concatenated corpus; returns the model and its final loss."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.models import llama

    mx.random.seed(recipe.seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    if recipe.train_steps == 0:  # the bench-size model keeps its random initialisation
        return model, float("nan")
    data = np.asarray(token_ids, dtype=np.int32)
    rng = np.random.default_rng(recipe.seed)
    span = recipe.sequence_length + 1

    def loss_fn(m: Any, x: Any, y: Any) -> Any:
        return nn.losses.cross_entropy(m(x), y, reduction="mean")

    optimizer = optim.AdamW(
        learning_rate=optim.cosine_decay(recipe.learning_rate, recipe.train_steps, 3e-4),
        weight_decay=0.01,
    )
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x: Any, y: Any) -> Any:
        loss, grads = value_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    loss_value = float("nan")
    for _ in range(recipe.train_steps):
        starts = rng.integers(0, len(data) - span, size=recipe.batch_size)
        batch = mx.array(np.stack([data[s : s + span] for s in starts]))
        loss = step(batch[:, :-1], batch[:, 1:])
        mx.eval(state, loss)
        loss_value = float(loss.item())
    return model, loss_value


def build(directory: Path, recipe: Recipe | None = None) -> dict[str, Any]:
    """Train tokenizer and model into `directory` (an mlx-lm model directory)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    recipe = recipe or Recipe()
    started = time.perf_counter()
    texts = list(corpus(recipe.corpus_documents, recipe.seed))
    tokenizer = train_tokenizer(texts, recipe.vocab_size)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    token_ids: list[int] = []
    for text in texts:
        token_ids.extend(tokenizer.encode(text).ids)
        token_ids.append(eos_id)
    vocab_size = tokenizer.get_vocab_size()
    config = _model_config(recipe, vocab_size, eos_id)
    model, loss = train_model(recipe, config, token_ids)

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(recipe.max_position_embeddings), indent=2)
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    parameters = sum(int(v.size) for v in weights.values())
    return {
        "recipe": asdict(recipe),
        "vocab_size": vocab_size,
        "eos_token_id": eos_id,
        "parameters": parameters,
        "corpus_tokens": len(token_ids),
        "final_train_loss": round(loss, 4) if recipe.train_steps else "untrained",
        "build_seconds": round(time.perf_counter() - started, 2),
    }


# --- model store --------------------------------------------------------------------------------


def exists(version: str = VERSION, name: str = NAME) -> bool:
    try:
        bentoml.models.get(bentoml.Tag(name, version))
    except bentoml.exceptions.NotFound:
        return False
    return True


def save_to_store(
    recipe: Recipe | None = None, version: str = VERSION, name: str = NAME
) -> tuple[str, dict]:
    bench = name == BENCH_NAME
    description = (
        "Random-weight Llama of the benchmark's size; output is random tokens by design"
        if bench
        else "Tiny Llama trained on generated text; output is nonsense by design"
    )
    with tempfile.TemporaryDirectory() as tmp:
        report = build(Path(tmp), recipe)
        with bentoml.models.create(
            bentoml.Tag(name, version),
            labels={"owner": LABEL_OWNER, "family": "llm", "framework": "mlx"},
            metadata={
                **report,
                "architecture": "llama",
                "task": "text-generation",
                "description": description,
            },
            module="models.tiny_llm",
        ) as model_ref:
            for path in Path(tmp).iterdir():
                Path(model_ref.path, path.name).write_bytes(path.read_bytes())
    return str(model_ref.tag), report


def ensure(version: str = VERSION, force: bool = False) -> str:
    """Build the model unless the store already has it; returns its tag. Idempotent."""
    if exists(version) and not force:
        return f"{NAME}:{version}"
    if exists(version):
        bentoml.models.delete(f"{NAME}:{version}")
    tag, _ = save_to_store(version=version)
    return tag


def ensure_bench(force: bool = False) -> str:
    """The bench-size model (`tiffin-bench-llm:v2`), built unless stored; returns its tag."""
    tag = f"{BENCH_NAME}:{BENCH_VERSION}"
    if exists(BENCH_VERSION, BENCH_NAME) and not force:
        return tag
    if exists(BENCH_VERSION, BENCH_NAME):
        bentoml.models.delete(tag)
    return save_to_store(BENCH_RECIPE, BENCH_VERSION, BENCH_NAME)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if stored")
    parser.add_argument("--output", type=Path, help="write the model directory here instead")
    parser.add_argument(
        "--bench", action="store_true", help=f"the bench-size random-weight model ({BENCH_NAME})"
    )
    args = parser.parse_args(argv)
    recipe = BENCH_RECIPE if args.bench else Recipe()
    name = BENCH_NAME if args.bench else NAME
    version = BENCH_VERSION if args.bench else VERSION
    if args.output is not None:
        print(json.dumps(build(args.output, recipe), indent=2))
        return 0
    prefix = f"{name}:{version}"
    if exists(version, name) and not args.force:
        print(f"{prefix} already in the model store, kept", flush=True)
        return 0
    if exists(version, name):
        bentoml.models.delete(prefix)
    what = "random-weight bench-size Llama" if args.bench else "tiny Llama on generated text"
    print(f"{prefix} training tokenizer, building {what} ...", flush=True)
    tag, report = save_to_store(recipe, version, name)
    shown = ", ".join(
        f"{k}={report[k]}"
        for k in ("parameters", "vocab_size", "final_train_loss", "build_seconds")
    )
    print(f"{prefix} saved {tag} ({shown})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
