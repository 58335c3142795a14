"""The workflow people run, all offline: prepare a corpus with a tokenizer, train from pretrained GPT-2
weights under a parallel layout, save in Hugging Face format, generate."""
import json
import os

import numpy as np
import pytest
import torch

from llmopt.core.config import TrainConfig, validate
from llmopt.prepare import prepare
from llmopt.step import build, train_step

CPU = torch.device("cpu")
PARAGRAPHS = [f"Paragraph {i}: the quick brown fox jumps over {i} lazy dogs.\nA second line, é and ü.\n"
              for i in range(60)]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A small GPT-2 made here and saved with save_pretrained (vocabulary 256: it trains on bytes)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=128,
                                           bos_token_id=255, eos_token_id=255)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text("\n".join(PARAGRAPHS), encoding="utf-8")
    return str(p)


def decode_split(out, split, decode):
    meta = json.loads((out / "meta.json").read_text())
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    assert len(ids) == meta[f"{split}_tokens"]
    return decode(ids.tolist())


def test_prepare_bytes_gives_the_text_back(tmp_path, text_file):
    from llmopt.prepare import ByteTokenizer

    out = tmp_path / "bytes"
    meta = prepare(text_file, "bytes", str(out), val_fraction=0.1, quiet=True)
    assert meta["dtype"] == "uint8" and meta["vocab_size"] == 256 and meta["documents"]["val"] >= 1
    text = decode_split(out, "train", ByteTokenizer().decode) + decode_split(out, "val", ByteTokenizer().decode)
    assert sorted("Paragraph " + p for p in text.split("Paragraph ") if p) == sorted(PARAGRAPHS)
    assert not os.path.exists(str(out) + ".tmp-" + str(os.getpid()))


def test_prepare_trained_bpe_gives_the_text_back(tmp_path, text_file):
    from transformers import AutoTokenizer

    out = tmp_path / "bpe"
    meta = prepare(text_file, "train:300", str(out), val_fraction=0.1, quiet=True)
    assert meta["vocab_size"] <= 300 and meta["dtype"] == "uint16" and meta["tokenizer_dir"] == "tokenizer"
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")  # saved in Hugging Face format
    docs = []
    for split in ("train", "val"):
        docs += [d for d in decode_split(out, split, tok.decode).split("<|endoftext|>") if d]
    assert sorted(docs) == sorted(PARAGRAPHS)


def test_prepare_refuses_an_existing_directory_and_a_missing_input(tmp_path, cli):
    r = cli("-m", "llmopt.data", "prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = cli("-m", "llmopt.data", "prepare", str(tmp_path), "--out", str(tmp_path))
    assert r.returncode == 2 and "already exists" in r.stderr


def test_a_model_directory_is_not_a_tokenizer(tmp_path, tiny_hf, text_file, cli):
    """AutoTokenizer on a model directory without tokenizer files gives a vocabulary of 1: it once made an
    all-zero train.bin and a model with loss 0.0000, exit 0."""
    r = cli("-m", "llmopt.data", "prepare", text_file, "--tokenizer", tiny_hf, "--out", str(tmp_path / "p"),
            env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a usable tokenizer" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "p")


def test_train_n_gives_the_vocabulary_the_bpe_learned(tmp_path, cli):
    """Raw text with --tokenizer train:4000 on a corpus that yields far fewer merges: the model's vocabulary,
    the saved config's and the saved tokenizer's are the prepared data's (no padding rows, once N)."""
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"d{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog {i}.\n")
    r = cli("-m", "llmopt.train", "--data", str(corpus), "--tokenizer", "train:4000", "--steps", "1", "--seq-len",
            "16", "--global-batch", "2", "--quiet", "--save", str(tmp_path / "m"),
            env={"LLMOPT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    (prepared,) = (tmp_path / "cache" / "prepared").glob("corpus-*")
    vocab = json.loads((prepared / "meta.json").read_text())["vocab_size"]
    assert vocab < 4000
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == vocab
    assert len(AutoTokenizer.from_pretrained(tmp_path / "m")) == vocab


def test_preparing_runs_that_race_use_the_winners_directory(tmp_path, text_file, monkeypatch):
    """Two runs preparing the same cache entry at once: the one that renames second once crashed with
    "Directory not empty". Here the other run finishes while this one writes; this one uses its copy."""
    import shutil

    from llmopt import prepare as prep

    out = tmp_path / "cache-entry"
    real_write = prep._write

    def write_while_another_finishes(source, spec, tmp, *args):
        meta = real_write(source, spec, tmp, *args)
        shutil.copytree(tmp, out)  # the winner's complete directory appears first
        (out / "winner").write_text("")
        return meta

    monkeypatch.setattr(prep, "_write", write_while_another_finishes)
    meta = prep.prepare(text_file, "bytes", str(out), val_fraction=0.1, quiet=True)
    assert (out / "winner").exists() and meta == json.loads((out / "meta.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-entry"]  # no .tmp-PID left beside it


def test_two_runs_on_one_raw_corpus_at_once_both_train(tmp_path):
    """End to end: two llmopt.train processes preparing the same raw corpus into one cache, started together:
    one prepares, the other waits on the lock and trains on its copy."""
    import subprocess
    import sys

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(200):
        (corpus / f"d{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20)
    env = dict(os.environ, LLMOPT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "llmopt.train", "--data", str(corpus), "--tokenizer", "train:500", "--steps", "1",
           "--seq-len", "16", "--global-batch", "2", "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert len(list((tmp_path / "cache" / "prepared").glob("corpus-*"))) == 1


def test_invalid_utf8_is_counted_not_silently_replaced(tmp_path, cli):
    (tmp_path / "c.txt").write_bytes(b"first paragraph \xff\xfe ok\n\nsecond \xe2\x82 one\n\n" + b"more text\n\n" * 30)
    r = cli("-m", "llmopt.data", "prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "p"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "4 invalid UTF-8 byte(s) replaced with U+FFFD" in r.stderr, r.stderr  # ff fe, and a cut e2 82
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["replaced_bytes"] == 4 and meta["files_with_replaced_bytes"] == ["c.txt"]


def test_a_huge_single_line_trains_its_bpe_in_bounded_memory(tmp_path):
    """A single 6 MB line once took about 230 bytes of memory per character to train a BPE on (9.1 GB for
    47 MB, 1.7 GB here); pieces of a bounded size keep the whole prepare near a constant (about 300 MB)."""
    import random
    import subprocess
    import sys

    rng = random.Random(0)
    words = [f"{w}{i}" for w in ("alpha", "beta", "gamma", "value", "self", "print") for i in range(50)]
    line = " ".join(rng.choice(words) for _ in range(900_000))
    (tmp_path / "big.txt").write_text(line + "\n\nA second paragraph.\n")
    # VmHWM: this process's own peak (getrusage's ru_maxrss starts from the parent's at the fork, and pytest's
    # own process holds a gigabyte by the end of a full run)
    code = ("import sys; from llmopt.prepare import main; rc = main(sys.argv[1:]); "
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code,
                        str(tmp_path / "big.txt"), "--tokenizer", "train:512", "--out", str(tmp_path / "p"), "--quiet",
                        "--val-fraction", "0.5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_mib = int(r.stdout.strip().splitlines()[-1]) / 1024
    assert len(line) > 6e6 and peak_mib < 700, peak_mib


@pytest.mark.parametrize("kind", ["fifo", "dangling", "loop"])
def test_unreadable_input_files_are_one_error_line(tmp_path, cli, kind):
    """A FIFO among the input files once blocked prepare forever; a dangling link or a link loop raised."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text\n")
    if kind == "fifo":
        os.mkfifo(corpus / "b.txt")
    elif kind == "dangling":
        os.symlink(tmp_path / "gone.txt", corpus / "b.txt")
    else:
        os.symlink(corpus / "c.txt", corpus / "b.txt")
        os.symlink(corpus / "b.txt", corpus / "c.txt")
    r = cli("-m", "llmopt.data", "prepare", str(corpus), "--out", str(tmp_path / "p"), timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "b.txt" in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_prepare_out_that_cannot_be_created_is_one_error_line(tmp_path, text_file, cli, where):
    (tmp_path / "f").write_text("")
    out = {"under-a-file": tmp_path / "f" / "p", "proc": "/proc/llmopt-test/p"}[where]
    r = cli("-m", "llmopt.data", "prepare", text_file, "--out", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot create" in r.stderr, r.stderr


def test_a_killed_prepares_leftover_is_removed(tmp_path, text_file):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"p.tmp-{int(dead.stdout)}"
    leftover.mkdir()
    (leftover / "train.bin").write_bytes(b"\0" * 1000)
    prepare(text_file, "bytes", str(tmp_path / "p"), val_fraction=0.1, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_trains_on_a_prepared_directory_and_reads_val_bin(tmp_path, text_file):
    out = tmp_path / "p"
    prepare(text_file, "train:300", str(out), val_fraction=0.1, quiet=True)
    cfg = validate(TrainConfig(data=str(out), global_batch=4, seq_len=16, steps=3, eval_every=3, eval_batches=1))
    assert cfg.model_config.vocab_size == json.loads((out / "meta.json").read_text())["vocab_size"]
    state = build(cfg, CPU)
    x, y = state.source.batch(0, 4, 16, split="val")
    val = np.fromfile(out / "val.bin", dtype="uint16")
    assert all(any((val[i:i + 16] == row.numpy()).all() for i in range(len(val) - 15)) for row in x)
    assert torch.isfinite(train_step(state, 0).loss)


@pytest.mark.parametrize("damage, match", [
    ("truncate", "truncated"), ("no-val", "val.bin is missing"), ("dtype", "cannot hold"),
    ("meta", "malformed"), ("vocab", "vocabulary of 256"),
    # edits whose sizes still agree with the files: caught by prepare's seal, before any step
    ("uint32", "does not describe train.bin"), ("vocab-below-ids", "does not describe train.bin"),
    ("absolute-tokenizer-dir", "not a directory inside it"),
    # a data directory from someone else: --save must copy none of these beside the model (refused at start)
    ("tokenizer-link-to-secret", "a link"), ("weights-in-tokenizer", "model.safetensors"),
    ("directory-in-tokenizer", "a directory"), ("tokenizer-dir-a-link", "missing or a link"),
    ("eval-batches", "held-out split of --data has"),  # more than val.bin holds: once ran with no end in sight
])
def test_a_broken_data_directory_is_one_error_line(tmp_path, text_file, tiny_hf, cli, damage, match):
    out = tmp_path / "p"
    prepare(text_file, "train:300", str(out), val_fraction=0.1, quiet=True)
    meta = json.loads((out / "meta.json").read_text())
    extra = []
    if damage == "truncate":
        with open(out / "train.bin", "r+b") as f:
            f.truncate(os.path.getsize(out / "train.bin") - 1)
    elif damage == "no-val":
        os.remove(out / "val.bin")
    elif damage == "dtype":
        (out / "meta.json").write_text(json.dumps(dict(meta, dtype="uint8")))
    elif damage == "meta":
        (out / "meta.json").write_text("{not json")
    elif damage == "uint32":  # two uint16 tokens read as one uint32: the byte sizes still agree
        half = {s: meta[f"{s}_tokens"] // 2 for s in ("train", "val")}
        for split, n in half.items():
            with open(out / f"{split}.bin", "r+b") as f:
                f.truncate(4 * n)
        (out / "meta.json").write_text(json.dumps(dict(meta, dtype="uint32", train_tokens=half["train"],
                                                       val_tokens=half["val"])))
    elif damage == "vocab-below-ids":  # once an IndexError in the embedding
        (out / "meta.json").write_text(json.dumps(dict(meta, vocab_size=200)))
    elif damage == "absolute-tokenizer-dir":  # --save would copy an arbitrary directory
        (out / "meta.json").write_text(json.dumps(dict(meta, tokenizer_dir="/etc")))
        extra = ["--save", str(tmp_path / "saved")]
    elif damage == "tokenizer-link-to-secret":
        (tmp_path / "secret").write_text("password")
        os.symlink(tmp_path / "secret", out / "tokenizer" / "vocab.json")
    elif damage == "weights-in-tokenizer":  # once silently replaced the trained weights in --save
        (out / "tokenizer" / "model.safetensors").write_bytes(b"planted")
    elif damage == "directory-in-tokenizer":  # once an IsADirectoryError after training: the run lost
        (out / "tokenizer" / "sub").mkdir()
    elif damage == "tokenizer-dir-a-link":
        os.rename(out / "tokenizer", tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", out / "tokenizer")
    if damage.startswith(("tokenizer-", "weights-", "directory-")):
        extra = ["--save", str(tmp_path / "saved")]
    elif damage == "eval-batches":
        extra = ["--eval-every", "1", "--eval-batches", "100000"]
    elif damage == "vocab":  # a checkpoint of vocabulary 256 against data of vocabulary ~300
        extra = ["--init", f"hf:{tiny_hf}"]
    r = cli("-m", "llmopt.train", "--data", str(out), "--steps", "1", "--seq-len", "16", *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and match in r.stderr, r.stderr


def test_init_loads_the_pretrained_weights(tiny_hf, text_file):
    """The first loss from --init equals GPT2LMHeadModel's own loss on the same batch (an independent
    forward through transformers)."""
    from transformers import GPT2LMHeadModel

    cfg = validate(TrainConfig(init=f"hf:{tiny_hf}", preset="checkpoint", data=text_file, global_batch=4,
                               seq_len=32, steps=1))
    assert (cfg.model_config.n_layer, cfg.model_config.n_embd) == (2, 64)
    state = build(cfg, CPU)
    x, y = state.source.batch(0, 4, 32)
    hf = GPT2LMHeadModel.from_pretrained(tiny_hf).eval()
    with torch.no_grad():
        logits = hf(input_ids=x).logits
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert abs(train_step(state, 0).loss.item() - want) < 1e-5
    # --model-impl hf loads GPT2LMHeadModel directly, from the same weights
    hf_state = build(validate(TrainConfig(**{**cfg.__dict__, "model_impl": "hf"})), CPU)
    assert type(hf_state.model).__name__ == "HFCausalLM"
    assert abs(train_step(hf_state, 0).loss.item() - want) < 1e-5
    with pytest.raises(ValueError, match="disagrees"):
        validate(TrainConfig(init=f"hf:{tiny_hf}", preset="tiny", data=text_file))


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--dp", "2", "--dp-mode", "fsdp"], ["--pp", "2"],
                                    ["--dp", "2", "--dp-mode", "fsdp", "--activation-checkpointing"]], ids=str)
def test_init_trains_under_a_layout_and_save_round_trips(tmp_path, tiny_hf, text_file, cli, layout):
    """--init under TP, FSDP2 and PP reproduces the single-process loss curve; --save gathers the shards into
    a directory that GPT2LMHeadModel.from_pretrained loads with the same logits as the single-process model
    (with activation checkpointing too: torch's state-dict API strips its wrapper's prefix), the model of the
    three trained steps even when --memory-breakdown runs one more."""
    from transformers import GPT2LMHeadModel

    from llmopt.checkpoint import save_pretrained

    common = dict(init=f"hf:{tiny_hf}", preset="checkpoint", data=text_file, global_batch=4, seq_len=32, steps=3)
    state = build(validate(TrainConfig(**common)), CPU)
    ref = [train_step(state, s).loss.item() for s in range(3)]
    save_pretrained(state, str(tmp_path / "single"))
    args = ["-m", "llmopt.train", "--quiet", "--init", f"hf:{tiny_hf}", "--data", text_file, "--global-batch", "4",
            "--seq-len", "32", "--steps", "3", "--metrics-out", str(tmp_path / "m.json"), "--save",
            str(tmp_path / "layout"), "--memory-breakdown", *layout]  # saved before the breakdown's extra step
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = json.loads((tmp_path / "m.json").read_text())["losses"]
    assert max(abs(a - b) for a, b in zip(losses, ref)) < 1e-4 and abs(ref[-1] - ref[0]) > 1e-3
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = state.model(x)
        single = GPT2LMHeadModel.from_pretrained(tmp_path / "single").eval()(input_ids=x).logits
        gathered = GPT2LMHeadModel.from_pretrained(tmp_path / "layout").eval()(input_ids=x).logits
    assert (single - mine).abs().max().item() < 1e-4
    assert (gathered - mine).abs().max().item() < 1e-4
    assert sorted(os.listdir(tmp_path)) == ["layout", "m.json", "single"]  # no half-written directory left


def test_a_matrix_with_init_and_no_preset_runs(tmp_path, tiny_hf, text_file, cli):
    """The README's matrix use of init: the shape comes from the checkpoint (the harness once passed
    --preset checkpoint, which llmopt.train refuses, and every config failed)."""
    (tmp_path / "m.toml").write_text(f"[base]\ninit = 'hf:{tiny_hf}'\ndata = '{text_file}'\nsteps = 2\n"
                                     "seq_len = 32\nglobal_batch = 4\n[matrix]\noptimizer = ['adamw']\n")
    from conftest import bench_here

    r = bench_here("--matrix", tmp_path / "m.toml", "--out", tmp_path / "o", "--no-report")
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "bench: ok 1", r.stdout[-2000:]


def _damaged_checkpoint(src: str, dst, damage: str) -> str:
    """A copy of the tiny GPT-2 with one thing wrong that once loaded silently or raised a traceback."""
    import shutil

    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    config = json.loads((dst / "config.json").read_text())
    if damage == "another-models-weights":  # a GPT-2 config.json beside BERT's weights: every weight missing
        BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                             vocab_size=256)).save_pretrained(dst / "bert")
        shutil.move(dst / "bert" / "model.safetensors", weights)
    elif damage in ("untied", "unscaled", "scaled-by-layer"):
        kw = {"untied": dict(tie_word_embeddings=False), "unscaled": dict(scale_attn_weights=False),
              "scaled-by-layer": dict(scale_attn_by_inverse_layer_idx=True)}[damage]
        shutil.rmtree(dst)
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=128,
                                   **kw)).save_pretrained(dst)
    elif damage == "truncated":
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    elif damage == "random":
        weights.write_bytes(os.urandom(4096))
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "pickled":
        import pickle

        weights.unlink()
        with open(dst / "pytorch_model.bin", "wb") as f:
            pickle.dump({"not": "a state dict"}, f)
    assert config["model_type"] == "gpt2"
    return str(dst)


@pytest.mark.parametrize("damage, match", [
    ("another-models-weights", "missing"), ("untied", "tie_word_embeddings=False"),
    ("unscaled", "scale_attn_weights=False"), ("scaled-by-layer", "scale_attn_by_inverse_layer_idx=True"),
    ("truncated", "cannot be read"), ("random", "cannot be read"), ("no-weights", "no weights file"),
    ("pickled", "not a state dict"),
])
def test_a_checkpoint_llmopt_cannot_honour_is_one_error_line(tmp_path, tiny_hf, text_file, capsys, damage, match):
    """--init and llmopt.sample refuse, before any step, what llmopt's GPT would not compute exactly or could
    not read: random weights in place of missing ones, a dropped lm_head, other attention scaling. (In this
    process: the entry points' mains, as the command line calls them.)"""
    from llmopt import sample, train

    ck = _damaged_checkpoint(tiny_hf, tmp_path / "ck", damage)
    capsys.readouterr()  # the test's own save_pretrained output
    for main, argv in ((train.main, ["--init", f"hf:{ck}", "--data", text_file, "--steps", "1", "--seq-len", "16"]),
                       (sample.main, [ck, "--max-new-tokens", "2"])):
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error:") and match in err, err[-2000:]
        assert "step" not in out


@pytest.mark.parametrize("case", ["save-proc", "save-sys", "profile-proc", "save-without-tokenizer"])
def test_outputs_that_would_fail_after_training_are_refused_before(tmp_path, text_file, capsys, case):
    """--save /proc/x and /sys/x passed the permission check and failed after every step had trained; a prepared
    directory without its tokenizer failed at --save; --profile /proc/x raised. Each is one line, no step."""
    from llmopt import train

    data = tmp_path / "p"
    prepare(text_file, "train:300", str(data), val_fraction=0.1, quiet=True)
    argv = ["--data", str(data), "--steps", "1", "--seq-len", "16", "--global-batch", "2"]
    if case == "save-without-tokenizer":
        import shutil

        shutil.rmtree(data / "tokenizer")
        argv += ["--save", str(tmp_path / "m")]
    else:
        flag, where = case.split("-")
        argv += [f"--{flag}", f"/{where}/llmopt-test"]
    capsys.readouterr()
    rc = train.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:") and "step" not in out, err
    assert not os.path.exists(tmp_path / "m")


def test_sample_streams_and_prints_only_text(tmp_path, tiny_hf, cli):
    """No progress bars from transformers; the text is written as it is made (a run cut short keeps it)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "llmopt.sample", tiny_hf, "--max-new-tokens", "1000000000",
                             "--temperature", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    r = cli("-m", "llmopt.sample", tiny_hf, "--prompt", "ab", "--max-new-tokens", "5", "--seed", "1")  # meanwhile
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("ab"), r.stderr
    first = proc.stdout.read(64)  # arrives long before the run would end
    proc.kill()
    proc.wait()
    assert len(first) == 64


@pytest.mark.parametrize("argv, match", [
    (["--seed", "99999999999999999999"], "--seed"),
    (["--prompt", "caf\udcff"], "--prompt holds a byte that is not UTF-8"),  # argv's surrogate escape of byte ff
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
])
def test_sample_refuses_bad_arguments_in_one_line(tiny_hf, capsys, argv, match):
    from llmopt import sample

    rc = sample.main([tiny_hf, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and match in err, err


@pytest.mark.parametrize("argv", [["--init", "hf:gpt2"], ["--data", "python-stdlib", "--tokenizer", "gpt2"]],
                         ids=["init", "tokenizer"])
def test_a_hub_name_that_cannot_be_fetched_fails_in_seconds(cli, tmp_path, argv):
    """Not cached and the Hub unreachable: one line from llmopt's quick probe of the Hub's host ("cannot be
    reached"), not transformers' half-minute of retries and their warnings. The Hub is a closed local port
    here, so the test never tries the network."""
    r = cli("-m", "llmopt.train", *argv, "--steps", "1",
            env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
                 "LLMOPT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot be reached" in r.stderr, r.stderr


def test_offline_init_is_one_error_line(cli):
    r = cli("-m", "llmopt.train", "--init", "hf:no-such-org/no-such-model", "--steps", "1",
            env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "local copy" in r.stderr, r.stderr


def test_a_killed_saves_leftover_is_removed_by_the_next_save(tmp_path, tiny_hf, text_file):
    """A SIGKILLed --save leaves DIR.tmp-PID (100 MB for gpt2), which nothing reused or removed."""
    import subprocess
    import sys

    from llmopt.checkpoint import save_pretrained

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (tmp_path / f"m.tmp-{dead}").mkdir()
    (tmp_path / f"m.tmp-{dead}" / "model.safetensors").write_bytes(b"\0" * 4096)
    state = build(validate(TrainConfig(init=f"hf:{tiny_hf}", preset="checkpoint", data=text_file, global_batch=4,
                                       seq_len=32, steps=1)), CPU)
    save_pretrained(state, str(tmp_path / "m"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_sample_is_deterministic_under_a_seed(tmp_path, tiny_hf, text_file, capsys):
    from llmopt import sample
    from llmopt.checkpoint import save_pretrained

    state = build(validate(TrainConfig(init=f"hf:{tiny_hf}", preset="checkpoint", data=text_file, global_batch=4,
                                       seq_len=32, steps=2)), CPU)
    train_step(state, 0)
    save_pretrained(state, str(tmp_path / "m"))
    capsys.readouterr()
    runs = []
    for seed in (3, 3, 4):  # in this process: llmopt.sample's main, as its command line calls it
        assert sample.main([str(tmp_path / "m"), "--prompt", "The quick", "--max-new-tokens", "20",
                            "--seed", str(seed)]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and runs[0].startswith("The quick")
    assert len(runs[0]) > len("The quick") and runs[0] != runs[2]


def test_python_stdlib_corpus_trains_without_downloading(tmp_path, cli):
    r = cli("-m", "llmopt.train", "--data", "python-stdlib", "--steps", "2", "--seq-len", "32", "--quiet",
            "--metrics-out", str(tmp_path / "m.json"), env={"LLMOPT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["entropy_floor_nats"] is None and m["config"]["data"] == "python-stdlib"
    (prepared,) = os.listdir(tmp_path / "cache" / "prepared")
    meta = json.loads((tmp_path / "cache" / "prepared" / prepared / "meta.json").read_text())
    assert meta["source"] == "python-stdlib" and meta["train_tokens"] > 1_000_000
    # a held-out split that one eval of the convergence studies fits in (64 sequences of 128 tokens)
    assert meta["documents"]["val"] > 1 and meta["val_tokens"] > 64 * 128
