"""Supervised fine-tuning data (``data.source: sft``): prompt -> response pairs as rows whose ``loss_mask`` marks
the response, so the objective is the *conditional* NELBO of the response given the clean prompt (LLaDA's SFT:
the prompt is never masked and never in the loss; ``tdlm/sequences.py`` carries the mask into the noise).

Input: ``data.paths`` = jsonl files, one example per line, either
    {"prompt": "...", "response": "..."}             or
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}
(the last message is the response; it must be the assistant's). Without ``data.paths`` the embedded corpus
``stdlib_qa`` is used: "What does `json.dumps` do?" -> the first sentence of its docstring, built from this
machine's standard library.

Rendering (``data.sft_template``): ``chat`` uses the tokenizer's chat template for ``messages`` (an error if it
has none); ``plain`` uses the plain template below; ``auto`` (default) the chat template when the tokenizer has
one, else the plain one. The plain template is

    [BOS] {prompt} "\\n"  |  {response} [EOS]                 (prompt/response)
    [BOS] {role}: {content} "\\n" ... "assistant: "  |  {response} [EOS]     (messages)

where ``|`` is the prompt/response boundary. Rows are right-filled to ``data.seq_len`` by ``data.sft_padding``:
``pad`` (default) with [PAD], never attended, masked or scored; ``eos`` (LLaDA) with [EOS] that count as response
tokens, attended and scored, so the model learns to stop (and the bound's denominator counts them).
A row whose prompt + response do not fit: ``data.sft_overlong: refuse`` (default) stops with the file and line;
``truncate`` keeps at most max(seq_len - response, seq_len / 2) prompt tokens (its first token and its end), then
cuts the response to fit (losing its EOS).
"""

from __future__ import annotations

import ast
import json
import re
import sysconfig
from pathlib import Path

from .config import ConfigError, DataSection
from .data import is_validation

EMBEDDED = "<stdlib_qa>"


# ----------------------------------------------------------------------------------------------------------
# The embedded corpus


def first_sentence(doc: str) -> str:
    """The docstring's first sentence: its first paragraph up to the first '. ' (or its end), on one line."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.search(r"\.(\s|$)", para)
    return para[: m.start() + 1] if m else para


def stdlib_qa(min_chars: int = 20, max_chars: int = 160) -> list[dict]:
    """{prompt, response} pairs: "What does `module.name` do?" -> the first sentence of the docstring of a public
    top-level function or class of a public standard-library module. Deterministic (sorted, deduplicated)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo", "ensurepip"}
    pairs = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if skip & set(parts) or any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        module = ".".join(p for p in parts if p != "__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or not doc.isascii():
                continue
            answer = first_sentence(doc)
            if min_chars <= len(answer) <= max_chars and answer[0].isupper():
                question = f"What does `{module}.{node.name}` do?"
                pairs.setdefault(question, answer)
    return [{"prompt": q, "response": a} for q, a in sorted(pairs.items())]


# ----------------------------------------------------------------------------------------------------------
# Reading and checking examples


def read_examples(cfg: DataSection) -> list[tuple[str, dict]]:
    """[(where, example)] with where = 'FILE:LINE'; each example is checked here, one error naming its line."""
    if not cfg.paths:
        return [(f"{EMBEDDED}:{i + 1}", ex) for i, ex in enumerate(stdlib_qa())]
    out = []
    for p in cfg.paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"data.paths: file not found: {path}")
        if path.suffix != ".jsonl":
            raise ConfigError(f"data.paths: {path} is not a .jsonl file (data.source=sft)")
        for where, ex in jsonl_records(path):
            out.append((where, check_example(ex, where)))
    if not out:
        raise ConfigError(f"data.paths: no examples in {', '.join(map(str, cfg.paths))}")
    return out


def check_example(ex, where: str) -> dict:
    if not isinstance(ex, dict):
        raise ConfigError(f"{where}: expected a JSON object with prompt/response or messages")
    if "messages" in ex:
        msgs = ex["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ConfigError(f"{where}: 'messages' must be a list of at least two {{role, content}} objects")
        if msgs[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: the last message is the response and must be the assistant's, got "
                              f"{msgs[-1]['role']!r}")
        if not msgs[-1]["content"].strip():
            raise ConfigError(f"{where}: empty response (the last message's content)")
        return ex
    if not isinstance(ex.get("prompt"), str) or not isinstance(ex.get("response"), str):
        raise ConfigError(f"{where}: needs string fields 'prompt' and 'response', or 'messages' "
                          f"(keys: {', '.join(map(str, ex)) or 'none'})")
    if not ex["response"].strip():
        raise ConfigError(f"{where}: empty response")
    return ex


# ----------------------------------------------------------------------------------------------------------
# Rendering and tokenizing


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def prompt_ids(context, tok, template: str, where: str) -> list[int]:
    """Token ids of a prompt: ``context`` is the prompt text or the messages before the response, rendered by the
    template ``data.sft_template`` asks for (module docstring); generation renders prompts with the same one."""
    chat = isinstance(context, list) and template != "plain" and has_chat_template(tok)
    if isinstance(context, list) and template == "chat" and not has_chat_template(tok):
        name = tok.name_or_path or "trained on the data"
        raise ConfigError(f"{where}: 'messages' need a chat template and the tokenizer ({name}) has none "
                          f"(data.sft_template=auto or plain uses the plain template)")
    if chat:
        text = tok.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    if isinstance(context, list):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in context) + "assistant: "
    else:
        text = context + "\n"
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


def encode(ex: dict, tok, cfg: DataSection, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids with EOS) by the template of ``data.sft_template`` (module docstring)."""
    msgs = ex.get("messages")
    context, response = (msgs[:-1], msgs[-1]["content"]) if msgs is not None else (ex["prompt"], ex["response"])
    prompt = prompt_ids(context, tok, cfg.sft_template, where)
    return prompt, tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def jsonl_records(path: Path):
    """(``file:line``, record) of each non-blank line of a jsonl file; a line that is not JSON is one clear error."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None


def read_prompts(path: str) -> list[tuple[str, object, str | None]]:
    """[(where, context, reference or None)] of a jsonl of prompts for generation: {prompt[, response]} or
    {messages} (a final assistant message is the reference)."""
    out = []
    for where, ex in jsonl_records(Path(path)):
        msgs = ex.get("messages") if isinstance(ex, dict) else None
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
            last = msgs[-1].get("role") == "assistant"
            out.append((where, msgs[:-1] if last else msgs, msgs[-1].get("content") if last else None))
        elif isinstance(ex, dict) and isinstance(ex.get("prompt"), str):
            out.append((where, ex["prompt"], ex.get("response")))
        else:
            raise ConfigError(f"{where}: needs a string 'prompt' or a list of 'messages'")
    if not out:
        raise ConfigError(f"--prompts: no prompts in {path}")
    return out


def fit_row(prompt: list[int], response: list[int], cfg: DataSection, where: str) -> tuple[list[int], int]:
    """(ids of at most seq_len, prompt length) by ``data.sft_overlong``."""
    L = cfg.seq_len
    if len(prompt) + len(response) <= L:
        return prompt + response, len(prompt)
    if cfg.sft_overlong == "refuse":
        raise ConfigError(f"{where}: prompt {len(prompt)} + response {len(response)} tokens exceed data.seq_len={L} "
                          f"(data.sft_overlong=truncate cuts such rows)")
    keep = max(L - len(response), L // 2)
    if len(prompt) > keep:
        prompt = prompt[:1] + prompt[len(prompt) - keep + 1:]
    return (prompt + response)[:L], len(prompt)


def sft_rows(examples: list[tuple[str, dict]], tok, cfg: DataSection) -> dict:
    """Columns {input_ids, loss_mask} of fixed length seq_len (``data.sft_padding`` fills the rest)."""
    fill, fill_scored = (tok.eos_token_id, True) if cfg.sft_padding == "eos" else (tok.pad_token_id, False)
    ids_col, mask_col = [], []
    for where, ex in examples:
        ids, n_prompt = fit_row(*encode(ex, tok, cfg, where), cfg, where)
        rest = cfg.seq_len - len(ids)
        ids_col.append(ids + [fill] * rest)
        mask_col.append([False] * n_prompt + [True] * (len(ids) - n_prompt) + [fill_scored] * rest)
    return {"input_ids": ids_col, "loss_mask": mask_col}


def split_examples(examples: list[tuple[str, dict]], val_fraction: float):
    """Deterministic train/validation split by a hash of the example (stable across runs and machines)."""
    train, val = [], []
    for item in examples:
        (val if is_validation(json.dumps(item[1], sort_keys=True), val_fraction) else train).append(item)
    return train, val


def example_texts(examples: list[tuple[str, dict]]) -> list[str]:
    """Every text of the examples (what a trained tokenizer learns from)."""
    out = []
    for _, ex in examples:
        out += [m["content"] for m in ex["messages"]] if "messages" in ex else [ex["prompt"], ex["response"]]
    return out


def build_sft_splits(cfg: DataSection, tok_factory, log=print):
    """(tokenizer, {split: datasets.Dataset of input_ids, loss_mask, idx}, info) for ``data.source: sft``.
    ``tok_factory(texts)`` makes the tokenizer (trained on the training texts, or a pretrained one)."""
    import datasets

    examples = read_examples(cfg)
    train, val = split_examples(examples, cfg.val_fraction)
    if cfg.max_documents:
        train, val = train[: cfg.max_documents], val[: max(1, int(cfg.max_documents * cfg.val_fraction))]
    if not train or not val:
        raise ConfigError(f"data.source=sft: the {'training' if not train else 'validation'} split is empty "
                          f"({len(examples)} examples; data.val_fraction={cfg.val_fraction})")
    tok = tok_factory(example_texts(train))
    if tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id:
        # padding is never attended or scored, so every response's EOS would be too: the model could not learn
        # to stop, and sft_padding=eos would silently act as pad
        raise ConfigError(f"data.tokenizer: {cfg.tokenizer} uses its EOS token ({tok.eos_token!r}) as padding; SFT "
                          f"needs a distinct pad token (add one, e.g. '[PAD]', and save the tokenizer)")
    log(f"sft: {len(train)} train / {len(val)} validation examples (vocab {len(tok)}, padding {cfg.sft_padding})")
    out = {}
    for name, part in (("train", train), ("validation", val)):
        ds = datasets.Dataset.from_dict(sft_rows(part, tok, cfg))
        out[name] = ds.map(lambda _, i: {"idx": i}, with_indices=True)
    info = {"source": "sft", "num_train_documents": len(train), "num_val_documents": len(val),
            "sft_padding": cfg.sft_padding, "sft_template": cfg.sft_template}
    return tok, out, info


# ----------------------------------------------------------------------------------------------------------
# Generation


def generate_responses(ck, prompts: list[tuple[str, object, str | None]], sampler, seed: int, accelerator,
                       seq_len: int) -> list[dict]:
    """One response per prompt from a loaded checkpoint (``tdlm.runs.load_checkpoint``), any sampler: the canvas is
    the rendered prompt followed by [MASK] up to ``seq_len`` (diffusion) or the prompt as a prefix (AR); the
    response is what follows the prompt up to the first EOS. Prompt i is sampled with its own generator (seed, i)
    on the process it is sharded to; every process returns all responses, in prompt order."""
    import torch

    from .accel import gather_objects, shard
    from .sampling import sample_checkpoint

    tok = ck.tokenizer
    template = ck.config.data.sft_template if ck.config is not None else "auto"
    model = ck.model.to(accelerator.device)
    mine = []
    for i in shard(accelerator, len(prompts)):
        where, context, reference = prompts[i]
        ids = prompt_ids(context, tok, template, where)
        if len(ids) >= seq_len:
            raise ConfigError(f"{where}: the prompt's {len(ids)} tokens leave nothing to generate in {seq_len}")
        canvas = torch.tensor(ids + [tok.mask_token_id] * (seq_len - len(ids)))
        (sample,), _ = sample_checkpoint(model, tok, [i], sampler, seed, canvas, 1)
        response = sample["ids"][len(ids):]
        if tok.eos_token_id in response:
            response = response[:response.index(tok.eos_token_id)]
        mine.append({"index": i, "prompt": context if isinstance(context, str) else context[-1]["content"],
                     "response": tok.decode(response, skip_special_tokens=True).strip(), "reference": reference,
                     "ids": response, "stopped": len(response) < len(sample["ids"]) - len(ids)})
    return sorted(gather_objects(accelerator, mine), key=lambda r: r["index"])
