"""Model registry (`stg weights`), the LLaVA-NeXT -> SpaceVLLM-7B converter, safety and OOM advice.

The converter runs on a tiny random checkpoint in LLaVA-Video-7B-Qwen2's layout (tests/tiny_llava_next.py).
Nothing here touches the network: fetch is tested against an unreachable local endpoint.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import tiny_llava_next as tiny
from test_cli import run
from stgcli.convert import NEW_TOKENS, convert_llava_next, map_key
from stgcli.errors import ModelError, UserError
from stgcli.weights import (MANIFEST, ModelEntry, cuda_oom_guard, estimate_memory_gib, oom_message, registry,
                            sha256_file, verify)

ROOT = Path(__file__).resolve().parent.parent
SHARD = 24_000  # bytes: the tiny model (~250 KB in bf16) spreads over several output shards


def files_digest(built: Path) -> str:
    """A built model's recorded sha256: of its manifest's file map (not of the manifest, which holds
    the build time)."""
    import hashlib

    files = json.loads((built / MANIFEST).read_text())["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Built models go under a temporary STG_HOME; no user registry leaks in."""
    monkeypatch.setenv("STG_HOME", str(tmp_path / "stg-home"))
    monkeypatch.delenv("STG_WEIGHTS", raising=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(checkpoint dir, its tensors) in the LLaVA-NeXT layout."""
    d = tmp_path_factory.mktemp("llava") / "LLaVA-Video-tiny"
    return d, tiny.write_checkpoint(d)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    src, _ = source
    out = tmp_path_factory.mktemp("conv") / "spacevllm-7b"
    return convert_llava_next(src, out, max_shard_bytes=SHARD, seed=0, overrides=tiny.OVERRIDES)


# -- converter --------------------------------------------------------------------------------------
def test_every_source_tensor_lands_where_it_should(source, converted):
    from stgcli.models.spacevllm import SpaceVLLMForConditionalGeneration

    src, tensors = source
    model, info = SpaceVLLMForConditionalGeneration.from_pretrained(converted, dtype=torch.bfloat16,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sd = model.state_dict()
    cfg = model.config
    new_ids = [cfg.image_token_index, cfg.video_token_index, cfg.query_token_index]
    n_vocab = cfg.image_token_index  # the three tokens follow the original vocabulary
    assert new_ids == [n_vocab, n_vocab + 1, n_vocab + 2]
    checked = 0
    for name, t in tensors.items():
        dst = map_key(name)
        assert dst in sd, (name, dst)
        got = sd[dst]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert got.shape == t.shape  # ids fit in the checkpoint's padded rows: no growth
            keep = [i for i in range(t.shape[0]) if i not in new_ids]
            torch.testing.assert_close(got[keep], t[keep], rtol=0, atol=0)
            mean = t[:n_vocab].double().mean(0).to(torch.bfloat16)
            for i in new_ids:
                torch.testing.assert_close(got[i], mean, rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, t, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked == len(tensors)
    # spot-check the renames the issue names
    assert map_key("model.mm_projector.0.weight") == "model.multi_modal_projector.linear_1.weight"
    assert map_key("model.mm_projector.2.bias") == "model.multi_modal_projector.linear_2.bias"
    assert map_key("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert (map_key("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")
            == "model.vision_tower.encoder.layers.0.mlp.fc1.weight")
    assert map_key("model.vision_tower.vision_tower.vision_model.head.probe") is None
    assert map_key("model.vision_tower.vision_tower.vision_model.embeddings.position_ids") is None
    # the only tensors not copied are the new space decoder's, initialised the model's way
    new = sorted(set(sd) - {map_key(k) for k in tensors})
    assert new and all(k.startswith("space_decoder.") for k in new)
    assert bool((sd["space_decoder.norm.weight"] == 1).all()) and bool((sd["space_decoder.pos_embed"] == 0).all())
    assert 0.01 < float(sd["space_decoder.visual_proj.weight"].float().std()) < 0.03  # normal(0, 0.02)
    # vision config read off the tensors; LLaVA-NeXT's feature layer is the saved tower's last
    assert cfg.vision_config.num_hidden_layers == tiny.VISION["num_hidden_layers"]
    assert cfg.vision_config.image_size == 64 and cfg.vision_feature_layer == -1


def test_output_is_sharded_and_manifested(converted):
    shards = sorted(converted.glob("model-*.safetensors"))
    assert len(shards) >= 4
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    largest = 0
    for p in shards:
        with safe_open(str(p), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        tensor_bytes = [2 * int(torch.tensor(s).prod()) if s else 2 for s in sizes]
        largest = max(largest, max(tensor_bytes))
        # a shard is never bigger than the limit, unless it holds a single bigger tensor
        assert sum(tensor_bytes) <= SHARD or len(tensor_bytes) == 1, p.name
    manifest = json.loads((converted / MANIFEST).read_text())
    on_disk = {p.name for p in converted.iterdir() if p.name != MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert manifest["files"]["config.json"] == sha256_file(converted / "config.json")
    assert not list(converted.glob("*.bin")) and not converted.with_name(converted.name + ".partial").exists()
    card = (converted / "MODEL_CARD.md").read_text()
    assert "UNTRAINED" in card.upper() and "fine-tun" in card


def test_converted_model_runs_a_forward_pass(converted):
    from stgcli.models.spacevllm import SpaceVLLMForConditionalGeneration, SpaceVLLMProcessor

    model = SpaceVLLMForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    proc = SpaceVLLMProcessor.from_pretrained(converted)
    for tok in NEW_TOKENS:
        assert proc.tokenizer.convert_tokens_to_ids(tok) in (model.config.image_token_index,
                                                              model.config.video_token_index,
                                                              model.config.query_token_index)
    assert proc.query_token_id == model.config.query_token_index
    times = [0.0, 0.5, 1.0]
    ids, text_mask = proc.encode_prompt("the man in red picks up the cup", times)
    assert ids.count(proc.query_token_id) == len(times)
    assert proc.tokenizer.decode(ids).startswith("<|im_start|>system")  # Qwen2 chat format survived
    frames = torch.rand(len(times), 64, 64, 3).mul(255).to(torch.uint8).numpy()
    pix = torch.from_numpy(proc.preprocess_frames(frames))[None]
    ids_t = torch.tensor([ids])
    tokens, boxes, presence = model.ground(ids_t, torch.ones_like(ids_t), pix, torch.tensor([text_mask]),
                                           max_new_tokens=3)
    assert 1 <= len(tokens) <= 3
    assert boxes.shape == (len(times), 4) and bool(torch.isfinite(boxes).all())
    assert bool(((presence >= 0) & (presence <= 1)).all())


def test_conversion_is_deterministic_and_grows_rows_when_needed(tmp_path, converted):
    src = tmp_path / "nopad"
    tensors = tiny.write_checkpoint(src, pad_rows=0)  # no spare rows: the 3 new tokens need new ones
    out = convert_llava_next(src, tmp_path / "out", max_shard_bytes=SHARD, seed=0, overrides=tiny.OVERRIDES)
    n = tensors["model.embed_tokens.weight"].shape[0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == 64 * -(-(n + 3) // 64)
    assert cfg["query_token_index"] == n + 2
    # same source (same random seed), same converter seed -> byte-identical weights and tokenizer
    a = json.loads((out / MANIFEST).read_text())["files"]
    b = json.loads((converted / MANIFEST).read_text())["files"]
    for f in ("tokenizer.json", "processor_config.json"):
        assert a[f] == b[f]
    again = convert_llava_next(src, tmp_path / "again", max_shard_bytes=SHARD, seed=0, overrides=tiny.OVERRIDES)
    c = json.loads((again / MANIFEST).read_text())["files"]
    assert {k: v for k, v in a.items() if k != "MODEL_CARD.md"} == {k: v for k, v in c.items() if k != "MODEL_CARD.md"}


def test_init_writes_to_the_registry_location_and_verifies(capsys, source, tmp_path):
    src, _ = source
    user_toml = tmp_path / "mine.toml"
    # spacevllm-7b's tiny stand-in: same recipe, written where the packaged entry says (STG_HOME)
    user_toml.write_text('[models.tiny-7b]\nsource = "cache:tiny-7b"\ndefault_quant = "4bit"\ndefault_frames = 8\n'
                         'build = {from = "llava-video-7b-qwen2", converter = "llava-next"}\n')
    from stgcli.weights import init_model

    out = init_model("tiny-7b", src=src, registry_file=user_toml, max_shard_bytes=SHARD, overrides=tiny.OVERRIDES)
    assert out == Path(os.environ["STG_HOME"]) / "tiny-7b"
    code, stdout, err = run(capsys, "weights", "--registry", str(user_toml), "verify", "tiny-7b")
    assert code == 0, err
    assert "verified against stg-manifest.json" in stdout
    code, stdout, _ = run(capsys, "weights", "--registry", str(user_toml), "path", "tiny-7b")
    assert code == 0 and stdout.strip() == str(out)
    code, stdout, _ = run(capsys, "weights", "--registry", str(user_toml), "list")
    line = next(x for x in stdout.splitlines() if x.startswith("tiny-7b"))
    assert "present" in line
    # the 4-bit default falls back to unquantized on a CPU; the model loads and reports its digest
    from stgcli.weights import load_model

    loaded = load_model("tiny-7b", device="cpu", registry_file=user_toml)
    assert loaded.quantization == "none" and loaded.sha256 == files_digest(out)
    # a corrupted shard stops the load with both digests
    shard = sorted(out.glob("model-*.safetensors"))[0]
    expected = json.loads((out / MANIFEST).read_text())["files"][shard.name]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run(capsys, "weights", "--registry", str(user_toml), "verify", "tiny-7b")
    assert_one_line_error(code, err, "checksum mismatch", expected, sha256_file(shard))
    # an existing model is not overwritten without --force
    code, _, err = run(capsys, "weights", "--registry", str(user_toml), "init", "tiny-7b", "--from", str(src))
    assert_one_line_error(code, err, "--force")


def test_init_errors_are_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "weights", "init", "spacevllm-7b", "--from", str(tmp_path / "missing"))
    assert_one_line_error(code, err, "missing", "no such directory")
    not_llava = tmp_path / "qwen-only"
    not_llava.mkdir()
    (not_llava / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    code, _, err = run(capsys, "weights", "init", "spacevllm-7b", "--from", str(not_llava))
    assert_one_line_error(code, err, "not a LLaVA-NeXT checkpoint")
    (not_llava / "config.json").write_text(json.dumps({"model_type": "llava_qwen", "mm_vision_tower": "openai/clip",
                                                      "mm_projector_type": "mlp2x_gelu"}))
    code, _, err = run(capsys, "weights", "init", "spacevllm-7b", "--from", str(not_llava))
    assert_one_line_error(code, err, "not SigLIP")
    code, _, err = run(capsys, "weights", "init", "spacevllm-7b")  # no --from and no fetched base
    assert_one_line_error(code, err, "--from DIR", "stg weights fetch llava-video-7b-qwen2")
    code, _, err = run(capsys, "weights", "init", "spacevllm-tiny-shapes", "--from", str(not_llava))
    assert_one_line_error(code, err, "not built by", "spacevllm-7b")
    code, _, err = run(capsys, "weights", "init", "spacevllm-7b", "--from", str(not_llava), "--shard-size", "lots")
    assert_one_line_error(code, err, "--shard-size")


def test_init_never_deletes_what_it_did_not_build(source, tmp_path):
    """--force replaces an earlier build only: not the source, not a folder of other files, not a
    user's OUT.partial; a failed or replaced build leaves nothing half-written behind."""
    src, _ = source
    kw = dict(max_shard_bytes=SHARD, seed=0, overrides=tiny.OVERRIDES)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src / "inside", src.parent):
        with pytest.raises(UserError, match="--from"):
            convert_llava_next(src, out, force=True, **kw)
    assert sorted(p.name for p in src.iterdir()) == before
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(UserError, match="not a stg build"):
        convert_llava_next(src, mine, force=True, **kw)
    assert (mine / "thesis.txt").read_text() == "years of work"
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(UserError, match="is a link"):
        convert_llava_next(src, link, force=True, **kw)
    (tmp_path / "o.partial").mkdir()
    (tmp_path / "o.partial" / "notes.txt").write_text("mine")
    out = convert_llava_next(src, tmp_path / "o", **kw)
    assert (tmp_path / "o.partial" / "notes.txt").read_text() == "mine"
    (out / "from-the-first-build").write_text("x")
    convert_llava_next(src, tmp_path / "o", force=True, **kw)  # an earlier build is replaced, whole
    assert (out / MANIFEST).is_file() and not (out / "from-the-first-build").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "mydata", "o", "o.partial"]


def test_unknown_tensor_and_pickle_sources_are_refused(source, tmp_path):
    with pytest.raises(ModelError, match="unexpected tensor 'model.vision_resampler.w'"):
        map_key("model.vision_resampler.w")
    src, _ = source
    pkl = tmp_path / "pickle-ckpt"
    pkl.mkdir()
    shutil.copy(src / "config.json", pkl / "config.json")
    (pkl / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelError, match="pickle"):
        convert_llava_next(pkl, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- registry ---------------------------------------------------------------------------------------
def test_packaged_registry_entries():
    entries = registry()
    assert {"spacevllm-tiny-shapes", "llava-video-7b-qwen2", "spacevllm-7b"} <= set(entries)
    base, big = entries["llava-video-7b-qwen2"], entries["spacevllm-7b"]
    assert base.kind == "hf" and len(base.pinned_revision()) == 40
    assert base.hf_repo()[0] == "lmms-lab/LLaVA-Video-7B-Qwen2"
    assert big.default_quant == "4bit" and big.default_frames == 64 and big.build["from"] == base.name
    assert "untrained" in big.description.lower() and "fine-tun" in big.description.lower()
    for e in entries.values():
        assert e.description and e.license and e.size


def test_unpinned_hf_source_is_refused(capsys, tmp_path):
    toml = tmp_path / "w.toml"
    toml.write_text('[models.floating]\ndescription = "x"\nsource = "hf:someone/model@main"\n')
    for cmd in ("fetch", "path", "verify"):
        code, _, err = run(capsys, "weights", "--registry", str(toml), cmd, "floating")
        assert_one_line_error(code, err, "not pinned to a commit", "someone/model")
    code, out, _ = run(capsys, "weights", "--registry", str(toml), "list")
    assert code == 0 and "unpinned" in next(x for x in out.splitlines() if x.startswith("floating"))


@pytest.mark.parametrize("body,needle", [
    ("models = 3\n", "'models' must be a table"),
    ("[models]\nfoo = 3\n", "model 'foo' must be a table"),
    ("[models.foo]\nsource = 5\n", "needs source"),
    ("[models.foo]\ndefault_frames = 8\n", "needs source"),
    ('[models.foo]\nsource = "m"\nfiles = "abc"\n', "files must be a table"),
    ('[models.foo]\nsource = "m"\nfiles = {"a" = "abc"}\n', "files.a must be a sha256"),
    ('[models.foo]\nsource = "m"\ndefault_quant = "2bit"\n', "default_quant must be none, 4bit or 8bit"),
    ('[models.foo]\nsource = "m"\ndefault_frames = "many"\n', "default_frames must be a int"),
    ('[models.foo]\nsource = "m"\nfiles = {"../x" = "' + "a" * 64 + '"}\n', "inside the model's directory"),
])
def test_malformed_registry_is_one_line(capsys, tmp_path, body, needle):
    toml = tmp_path / "w.toml"
    toml.write_text(body)
    code, _, err = run(capsys, "weights", "--registry", str(toml), "list")
    assert_one_line_error(code, err, needle, "w.toml")


def test_digests_are_case_blind_and_unpinned_loadable_files_are_refused(capsys, tmp_path):
    import tomllib

    d = tmp_path / "tiny"
    shutil.copytree(ROOT / "stgcli" / "weights" / "spacevllm-tiny-shapes", d)
    files = tomllib.loads((ROOT / "weights.toml").read_text())["models"]["spacevllm-tiny-shapes"]["files"]
    toml = tmp_path / "w.toml"
    pins = ", ".join(f'"{k}" = "{v.upper()}"' for k, v in files.items())
    toml.write_text(f'[models.mine]\nsource = "tiny"\nfiles = {{{pins}}}\n')
    code, out, err = run(capsys, "weights", "--registry", str(toml), "verify", "mine")
    assert code == 0, err
    (d / "special_tokens_map.json").write_text('{"eos_token": "red"}')  # would change the answers
    code, _, err = run(capsys, "weights", "--registry", str(toml), "verify", "mine")
    assert_one_line_error(code, err, "special_tokens_map.json", "not pinned")


def test_unknown_name_lists_known_ones(capsys):
    for cmd in ("verify", "path", "fetch", "init"):
        code, _, err = run(capsys, "weights", cmd, "no-such-model")
        assert_one_line_error(code, err, "unknown model 'no-such-model'", "spacevllm-tiny-shapes", "spacevllm-7b")


def test_user_registry_extends_packaged_and_works_from_any_directory(capsys, tmp_path, monkeypatch):
    toml = tmp_path / "w.toml"
    toml.write_text('[models.mine]\ndescription = "a copy"\nsource = "models/mine"\nfiles = {"a.txt" = "'
                    + "0" * 64 + '"}\n')
    monkeypatch.setenv("STG_WEIGHTS", str(toml))
    monkeypatch.chdir(tmp_path.parent)  # relative sources resolve against the toml, not the cwd
    names = set(registry())
    assert {"mine", "spacevllm-tiny-shapes"} <= names
    assert registry()["mine"].local_dir() == tmp_path / "models" / "mine"
    code, out, _ = run(capsys, "weights", "verify", "spacevllm-tiny-shapes")
    assert code == 0 and "6 files verified against weights.toml" in out
    toml.write_text('[models.bad]\nsourc = "typo"\n')
    code, _, err = run(capsys, "weights", "list")
    assert_one_line_error(code, err, "unknown keys", "sourc")


def test_verify_mismatch_prints_both_digests(capsys, tmp_path):
    pkg = ROOT / "stgcli" / "weights" / "spacevllm-tiny-shapes"
    copy = tmp_path / "copy"
    shutil.copytree(pkg, copy)
    entry = registry()["spacevllm-tiny-shapes"]
    files = ", ".join(f'"{k}" = "{v}"' for k, v in entry.files.items())
    toml = tmp_path / "w.toml"
    toml.write_text(f'[models.copy]\ndescription = "c"\nsource = "{copy}"\nfiles = {{{files}}}\n')
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    code, _, err = run(capsys, "weights", "--registry", str(toml), "verify", "copy")
    assert_one_line_error(code, err, "checksum mismatch", entry.files["config.json"],
                          sha256_file(copy / "config.json"))
    code, out, _ = run(capsys, "weights", "--registry", str(toml), "list", "--verify")
    assert "mismatch" in next(x for x in out.splitlines() if x.startswith("copy"))


def test_hf_cache_files_are_checked_against_hub_digests(tmp_path, monkeypatch):
    """Without per-file sha256s in the toml, a fetched snapshot is checked against the blob names
    of the HF cache: sha256 for LFS files, git's sha1 for small ones."""
    import hashlib

    import stgcli.weights as w

    rev = "a" * 40
    repo_dir = tmp_path / "models--org--m"
    snap, blobs = repo_dir / "snapshots" / rev, repo_dir / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    big, small = b"\x00weights" * 100, b'{"a": 1}'
    sha = hashlib.sha256(big).hexdigest()
    git = hashlib.sha1(b"blob %d\0" % len(small) + small).hexdigest()
    (blobs / sha).write_bytes(big)
    (blobs / git).write_bytes(small)
    (snap / "model.safetensors").symlink_to(Path("../../blobs") / sha)
    (snap / "config.json").symlink_to(Path("../../blobs") / git)
    monkeypatch.setattr(w, "_hf_cache", lambda: tmp_path)
    entry = ModelEntry(name="m", source=f"hf:org/m@{rev}")
    assert entry.local_dir() == snap
    assert verify(entry, snap) == "the Hugging Face Hub (cache blob names)"
    (blobs / sha).write_bytes(big + b"!")
    with pytest.raises(ModelError, match=f"expected sha256 {sha}"):
        verify(entry, snap)


def test_entry_without_digests_is_not_loaded(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError, match="no sha256 digests"):
        verify(ModelEntry(name="m", source=str(d)), d)


@pytest.mark.parametrize("offline", ["1", "0"])
def test_fetch_without_network_names_repo_revision_and_manual_copy(tmp_path, offline):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": offline,
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "stgcli", "weights", "fetch", "llava-video-7b-qwen2"],
                          capture_output=True, text=True, env=env, timeout=60)
    entry = registry()["llava-video-7b-qwen2"]
    rev = entry.pinned_revision()
    assert_one_line_error(proc.returncode, proc.stderr, "lmms-lab/LLaVA-Video-7B-Qwen2", rev,
                          f"--revision {rev} --local-dir DIR", "stg weights init spacevllm-7b --from DIR")
    assert proc.stdout == ""


def test_fetch_of_a_built_model_says_how_to_build_it(capsys):
    code, _, err = run(capsys, "weights", "fetch", "spacevllm-7b")
    assert_one_line_error(code, err, "stg weights init spacevllm-7b --from DIR")


def test_pickle_only_directory_is_refused_unless_allowed(capsys, tmp_path):
    from stgcli.weights import _check_safetensors

    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    code, out, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle",
                         "--model", str(tmp_path), "--device", "cpu")
    assert_one_line_error(code, err, "pickle", "--allow-pickle")
    with pytest.raises(ModelError, match="--allow-pickle"):
        _check_safetensors(tmp_path, allow_pickle=False)
    assert _check_safetensors(tmp_path, allow_pickle=True) is False
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "model.pt")  # a name transformers never loads
    with pytest.raises(ModelError, match="loads from pytorch_model.bin.*found model.pt"):
        _check_safetensors(tmp_path, allow_pickle=True)


# -- GPU memory advice --------------------------------------------------------------------------------
def test_memory_estimate_orders_quantizations_and_frames():
    from stgcli.models.spacevllm.configuration_spacevllm import spacevllm_7b_config

    cfg = spacevllm_7b_config()
    bf16, q8, q4 = (estimate_memory_gib(cfg, q, 64) for q in ("none", "8bit", "4bit"))
    assert 15 < bf16 < 25 and q4 < q8 < bf16 and 5 < q4 < 12  # 7.6B params: ~15 GiB of bf16 weights
    assert estimate_memory_gib(cfg, "4bit", 16) < q4


def test_oom_becomes_a_one_line_error_with_advice(capsys, monkeypatch):
    from stgcli.models.spacevllm.configuration_spacevllm import spacevllm_7b_config

    cfg = spacevllm_7b_config()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (12 * 1024**3, 80 * 1024**3))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=9))  # an H100
    with pytest.raises(ModelError) as exc:
        with cuda_oom_guard(cfg, "none", 64, "cuda:0"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    msg = str(exc.value)
    assert "out of GPU memory" in msg and "12.0 GiB of 80.0 GiB is free" in msg
    need = estimate_memory_gib(cfg, "none", 64)
    assert f"needs about {need:.1f} GiB" in msg
    assert "--quant 4bit" in msg or "--quant 8bit" in msg
    # nothing fits at all: say so instead of suggesting something that will fail again
    assert "even --quant 4bit --frames 8 does not fit" in oom_message(cfg, "4bit", 64, 1.0, 8.0)
    # enough memory for bf16 at fewer frames: suggest the frames, not a quantization
    assert oom_message(cfg, "none", 64, estimate_memory_gib(cfg, "none", 32) / 0.89, 80).endswith("try --frames 32")
    # float32 on the GPU (--dtype float32) counts 4 bytes for what is not quantized, and bfloat16 is the
    # mildest way out when it fits
    fp32 = estimate_memory_gib(cfg, "none", 64, 4)
    assert 1.8 * estimate_memory_gib(cfg, "none", 64) < fp32 < 2 * estimate_memory_gib(cfg, "none", 64)
    assert estimate_memory_gib(cfg, "4bit", 64) < estimate_memory_gib(cfg, "4bit", 64, 4) < fp32
    with pytest.raises(ModelError) as exc:
        with cuda_oom_guard(cfg, "none", 64, "cuda:0", 4):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    msg = str(exc.value)
    assert f"needs about {fp32:.1f} GiB" in msg and msg.endswith("try --dtype bfloat16 --quant 4bit")
    assert oom_message(cfg, "none", 64, fp32 / 1.5, 80, 4).endswith("try --dtype bfloat16")
    assert oom_message(cfg, "none", 64, estimate_memory_gib(cfg, "none", 32) / 0.89, 80, 4).endswith(
        "try --dtype bfloat16 --frames 32")
    # a V100 has no bfloat16 units: the 2-byte dtype it is told to try is the one auto would pick there
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=7))
    with pytest.raises(ModelError) as exc:
        with cuda_oom_guard(cfg, "none", 64, "cuda:0", 4):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert str(exc.value).endswith("try --dtype float16 --quant 4bit")
    # other errors pass through untouched
    with pytest.raises(ValueError):
        with cuda_oom_guard(cfg, "4bit", 64, "cuda:0"):
            raise ValueError("not memory")


@pytest.mark.parametrize("quant", ["4bit", "8bit", "none"])
def test_cuda_loading_settings_with_a_mocked_gpu(monkeypatch, quant):
    """No GPU here: check what load_model asks transformers for on CUDA (quantization, dtype, one
    device, sdpa) and that an OOM while loading becomes the one-line advice."""
    import stgcli.weights as w
    from stgcli.models.spacevllm import SpaceVLLMConfig, SpaceVLLMForConditionalGeneration

    calls = {}

    class Fake:
        config = SpaceVLLMConfig.from_pretrained(str(ROOT / "stgcli" / "weights" / "spacevllm-tiny-shapes"))

        def to(self, device):
            calls["to"] = device
            return self

        def eval(self):
            return self

    def fake_from_pretrained(path, **kwargs):
        calls.update(kwargs)
        return (Fake(), {}) if kwargs.get("output_loading_info") else Fake()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=8))  # Ampere or later
    monkeypatch.setattr(SpaceVLLMForConditionalGeneration, "from_pretrained", staticmethod(fake_from_pretrained))
    loaded = w.load_model(device="cuda:0", quant=quant)
    assert calls["dtype"] == torch.bfloat16 and calls["use_safetensors"] is True
    assert calls["attn_implementation"] in ("sdpa", "flash_attention_2")
    assert loaded.quantization == quant and loaded.device == "cuda:0" and loaded.dtype == "bfloat16"
    if quant == "none":
        assert "quantization_config" not in calls and calls["to"] == "cuda:0"
        return
    q = calls["quantization_config"]
    assert calls["device_map"] == {"": "cuda:0"}  # one GPU, nothing offloaded
    skip = set(q.llm_int8_skip_modules)
    assert {"model.vision_tower", "model.multi_modal_projector", "space_decoder", "lm_head"} <= skip
    if quant == "4bit":
        assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
        assert q.bnb_4bit_compute_dtype == torch.bfloat16
    else:
        assert q.load_in_8bit

    def oom(path, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(SpaceVLLMForConditionalGeneration, "from_pretrained", staticmethod(oom))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * 1024**3, 8 * 1024**3))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.raises(ModelError, match=f"--quant {quant} with 16 frames needs about"):
        w.load_model(device="cuda:0", quant=quant)


def test_oom_during_grounding_is_one_line_too(monkeypatch):
    """The forward pass (not only the load) maps a CUDA OOM to the advice, with the clip's frames."""
    from types import SimpleNamespace

    import numpy as np

    from stgcli.models.spacevllm.configuration_spacevllm import spacevllm_7b_config
    from stgcli.pipeline import run_model
    from stgcli.weights import LoadedModel

    def ground(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    model = SimpleNamespace(config=spacevllm_7b_config(), dtype=torch.float32, ground=ground)
    loaded = LoadedModel(model=model, processor=None, name="spacevllm-7b", sha256=None, device="cpu",
                         dtype="float32", quantization="8bit", default_frames=64)
    prep = {"ids": [1, 2, 3], "text_mask": [True, False, False], "pixels": np.zeros((48, 3, 4, 4), np.float32),
            "sampled": SimpleNamespace(indices=list(range(48)))}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (9 * 1024**3, 80 * 1024**3))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.raises(ModelError, match=r"--quant 8bit with 48 frames needs about .*9.0 GiB of 80.0 GiB is free"):
        run_model(loaded, prep)


def test_a_batch_that_does_not_fit_in_gpu_memory_is_grounded_clip_by_clip(monkeypatch, capsys):
    """run_models with several clips: a CUDA OOM in their shared prefill retries them one at a time (a note
    says so), and each clip's result is its own; an OOM of a single clip is still the advice."""
    from types import SimpleNamespace

    import numpy as np

    from stgcli.models.spacevllm.configuration_spacevllm import spacevllm_7b_config
    from stgcli.pipeline import run_models
    from stgcli.weights import LoadedModel

    calls = []

    def ground_many(clips, **k):
        calls.append(len(clips))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    def ground(ids, mask, pixels, text_mask, **k):
        calls.append(1)
        f = pixels.shape[1]
        return [int(ids[0, 0])], torch.full((f, 4), float(ids[0, 0])), torch.zeros(f)

    model = SimpleNamespace(config=spacevllm_7b_config(), dtype=torch.float32, ground=ground, ground_many=ground_many)
    proc = SimpleNamespace(decode=lambda tokens: f"clip {tokens[0]}")
    loaded = LoadedModel(model=model, processor=proc, name="spacevllm-7b", sha256=None, device="cpu",
                         dtype="float32", quantization="4bit", default_frames=4, span_decoding="text")
    preps = [{"ids": [k, 2, 3], "text_mask": [True, False, False], "pixels": np.zeros((4, 3, 4, 4), np.float32),
              "sampled": SimpleNamespace(indices=list(range(4)))} for k in (7, 8, 9)]
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = run_models(loaded, preps)
    assert calls == [3, 1, 1, 1]
    assert [o[0] for o in out] == ["clip 7", "clip 8", "clip 9"] and float(out[2][1][0, 0]) == 9.0
    assert "3 clips at once do not fit in GPU memory; grounding them one at a time" in capsys.readouterr().err


def test_cli_init_then_ground_end_to_end(capsys, source, tmp_path):
    """`stg weights init` with its defaults (7B decoder sizes), then `stg ground` on the result:
    an untrained model still gives a valid stg.grounding/v1 document through the user path."""
    from stgcli.result import validate

    src, _ = source
    out = tmp_path / "built"
    code, stdout, err = run(capsys, "weights", "init", "spacevllm-7b", "--from", str(src), "--out", str(out),
                            "--shard-size", "100KB")
    assert code == 0, err
    assert "untrained" in stdout and len(list(out.glob("model-*.safetensors"))) >= 2
    assert json.loads((out / "config.json").read_text())["decoder_hidden_size"] == 512
    code, stdout, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle",
                            "--model", str(out), "--device", "cpu", "--frames", "4", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    validate(doc)
    assert doc["model"]["sha256"] == files_digest(out) and doc["sampling"]["num_frames"] == 4


def _broken_copy(tmp_path, name):
    d = tmp_path / name
    shutil.copytree(ROOT / "stgcli" / "weights" / "spacevllm-tiny-shapes", d)
    return d


def _edit_weights(d, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("case,needle", [
    ("missing_tensor", "1 tensor(s) missing (e.g. space_decoder.box_head.2.weight)"),
    ("extra_tensor", "1 tensor(s) unexpected (e.g. space_decoder.extra)"),
    ("wrong_shape", "1 tensor(s) of the wrong shape (e.g. space_decoder.box_head.2.weight)"),
    ("truncated", "SafetensorError"),
    ("empty_config", "not a complete SpaceVLLM config"),
    ("other_model_type", "model_type 'llava_qwen'"),
    ("bad_field", "decoder_layers"),
    ("no_tokenizer", "tokenizer.json missing"),
])
def test_a_broken_model_directory_is_one_line_never_random_weights(capsys, tmp_path, case, needle):
    """transformers fills what a checkpoint lacks with random tensors (and builds a default 7B from an
    empty config): every such directory is refused before it can answer."""
    d = _broken_copy(tmp_path, case)
    cfg = json.loads((d / "config.json").read_text())
    if case == "missing_tensor":
        _edit_weights(d, lambda t: t.pop("space_decoder.box_head.2.weight"))
    elif case == "extra_tensor":
        _edit_weights(d, lambda t: t.update({"space_decoder.extra": torch.zeros(2)}))
    elif case == "wrong_shape":
        _edit_weights(d, lambda t: t.update({"space_decoder.box_head.2.weight":
                                             torch.zeros(t["space_decoder.box_head.2.weight"].shape[0] + 1,
                                                         t["space_decoder.box_head.2.weight"].shape[1])}))
    elif case == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "empty_config":
        (d / "config.json").write_text("{}")
    elif case == "other_model_type":
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llava_qwen"}))
    elif case == "bad_field":
        (d / "config.json").write_text(json.dumps({**cfg, "decoder_layers": "two"}))
    elif case == "no_tokenizer":
        (d / "tokenizer.json").unlink()
    code, out, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--model", str(d),
                         "--device", "cpu")
    assert_one_line_error(code, err, needle)
    assert out == ""


def test_a_base_checkpoint_or_empty_name_is_not_a_grounding_model(capsys):
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--model",
                       "llava-video-7b-qwen2")
    assert_one_line_error(code, err, "base checkpoint, not a grounding model", "stg weights init spacevllm-7b")
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--model", "")
    assert_one_line_error(code, err, "--model is empty")


def test_device_names_are_checked(monkeypatch):
    from stgcli.errors import UserError as UE
    from stgcli.weights import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cuda") == "cuda"
    for bad, needle in (("cuda:2", "has 2 CUDA GPUs (cuda:0 to cuda:1)"), ("cudafoo", "expected auto, cpu"),
                        ("cuda:x", "expected auto, cpu"), ("gpu", "expected auto, cpu")):
        with pytest.raises(UE, match=re.escape(needle)):
            resolve_device(bad)


@pytest.mark.parametrize("case,needle", [
    ("size", "image_size 160 / patch_size 16 do not match the vision tower's 128 / 16"),
    ("token", "token '<qq>' is id"),
    ("list", "must be a JSON object"),
])
def test_processor_that_does_not_fit_the_model_is_one_line(capsys, tmp_path, case, needle):
    d = _broken_copy(tmp_path, case)
    proc = json.loads((d / "processor_config.json").read_text())
    change = {"image_size": 160} if case == "size" else {"query_token": "<qq>"}
    proc = [proc] if case == "list" else {**proc, **change}
    (d / "processor_config.json").write_text(json.dumps(proc))
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--model", str(d),
                       "--device", "cpu")
    assert_one_line_error(code, err, needle)


def test_processor_keys_of_a_newer_stg_are_kept_not_fatal(tmp_path):
    from stgcli.models.spacevllm import SpaceVLLMProcessor

    d = _broken_copy(tmp_path, "newer")
    proc = json.loads((d / "processor_config.json").read_text())
    (d / "processor_config.json").write_text(json.dumps({**proc, "future_option": 3}))
    assert SpaceVLLMProcessor.from_pretrained(d).settings.extra["future_option"] == 3


def test_a_model_loaded_by_path_is_verified_where_digests_exist(capsys, tmp_path, monkeypatch):
    """By path too: a build's stg-manifest.json, or the registry entry of that very folder, is checked."""
    from stgcli.weights import write_manifest

    d = _broken_copy(tmp_path, "built")
    write_manifest(d)
    _edit_weights(d, lambda t: t["space_decoder.box_head.2.weight"].add_(1.0))  # changed after the build
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--model", str(d),
                       "--device", "cpu")
    assert_one_line_error(code, err, "checksum mismatch")
    # a registered model's own folder, named by path, is checked against its registry entry
    import tomllib

    mine = _broken_copy(tmp_path, "mine")
    files = tomllib.loads((ROOT / "weights.toml").read_text())["models"]["spacevllm-tiny-shapes"]["files"]
    toml = tmp_path / "w.toml"
    pins = ", ".join(f'"{k}" = "{v}"' for k, v in files.items())
    toml.write_text(f'[models.mine]\nsource = "mine"\nfiles = {{{pins}}}\n')
    monkeypatch.setenv("STG_WEIGHTS", str(toml))
    _edit_weights(mine, lambda t: t["space_decoder.box_head.2.weight"].add_(1.0))
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--model",
                       str(mine), "--device", "cpu")
    assert_one_line_error(code, err, "checksum mismatch", "model 'mine'")


def test_flag_mistakes_come_before_hashing_the_weights(capsys, monkeypatch):
    import stgcli.weights as w

    def no_hashing(*a, **k):
        raise AssertionError("hashed the weights before checking the flags")

    monkeypatch.setattr(w, "verify", no_hashing)
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--device", "cuda:x")
    assert_one_line_error(code, err, "--device cuda:x")
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--quant", "3bit")
    assert code == 2 and "3bit" in err and "hashed" not in err


def test_init_of_a_malformed_source_is_one_line(capsys, source, tmp_path):
    src, _ = source
    cases = {"config.json": "[1]", "model.safetensors.index.json": '{"weight_map": []}'}
    for fname, text in cases.items():
        bad = tmp_path / f"bad-{fname}"
        shutil.copytree(src, bad)
        (bad / fname).write_text(text)
        code, _, err = run(capsys, "weights", "init", "spacevllm-7b", "--from", str(bad), "--out", str(tmp_path / "o"))
        assert_one_line_error(code, err, fname)
    bad = tmp_path / "bad-shard"
    shutil.copytree(src, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    code, _, err = run(capsys, "weights", "init", "spacevllm-7b", "--from", str(bad), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, shard.name, "not a readable safetensors file")
    assert not (tmp_path / "o").exists()


def test_a_model_too_big_for_the_ram_is_refused_before_loading(capsys, monkeypatch):
    import stgcli.weights as w

    monkeypatch.setattr(w, "available_ram_gib", lambda: 0.1)
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--device", "cpu")
    assert_one_line_error(code, err, "not enough memory", "0.1 GiB is available", "--dtype bfloat16",
                          "--quant 4bit")
    from stgcli.models.spacevllm import SpaceVLLMConfig

    cfg = SpaceVLLMConfig.from_pretrained(str(w.registry()[w.DEFAULT_MODEL].local_dir()))
    bf16, fp32 = (w.estimate_memory_gib(cfg, "none", 1, size) for size in (2, 4))
    assert bf16 < fp32
    monkeypatch.setattr(w, "available_ram_gib", lambda: (bf16 + fp32) / 2)  # fits in bf16, not in fp32
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--device", "cpu")
    assert_one_line_error(code, err, "not enough memory", "--dtype bfloat16")
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--device", "cpu",
                       "--dtype", "bfloat16")
    assert code == 0, err
    monkeypatch.setattr(w, "available_ram_gib", lambda: 2.0)  # --frames is a request: the weights decide
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--device", "cpu",
                       "--frames", "100000")
    assert code == 0, err
    monkeypatch.setattr(w, "available_ram_gib", lambda: None)  # unknown (not Linux): no guess, it loads
    code, _, err = run(capsys, "ground", str(ROOT / "examples" / "shapes.mp4"), "the red circle", "--device", "cpu")
    assert code == 0, err
    from stgcli.models.spacevllm.configuration_spacevllm import spacevllm_7b_config

    assert w.estimate_memory_gib(spacevllm_7b_config(), "none", 64, 4) > 25  # the 7B in fp32


def test_a_shard_the_index_names_must_be_there(converted, tmp_path):
    from stgcli.weights import verify

    d = tmp_path / "build"
    shutil.copytree(converted, d)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelError, match=f"{shard.name}: named by model.safetensors.index.json but missing"):
        verify(ModelEntry(name="x", source=str(d)), d)
