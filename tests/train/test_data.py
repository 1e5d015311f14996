"""Data: corpus, file formats, tokenizers, packing, determinism and exact resumption."""

import gzip
import json

import numpy as np
import pytest

from jaxblocks.errors import ConfigError
from train.data import pipeline, sources, tokenizers
from train.data.config import DataConfig


def test_embedded_corpus_is_large_public_domain_text():
  text = sources.embedded_text()
  assert len(text.encode()) >= 1_000_000
  assert "gutenberg" not in text.lower()
  assert "HAMLET" in text and "BRUTUS." in text


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_pipeline_packs_deterministically_and_resumes_exactly():
  cfg = DataConfig(seq_len=16, global_batch_size=4, num_shards=2, prefetch=2)
  docs = sources.documents(cfg)
  train_docs, eval_docs = pipeline.split(docs, cfg.eval_fraction)
  train_idx, eval_idx = set(train_docs._indices.tolist()), set(eval_docs._indices.tolist())
  assert not train_idx & eval_idx and len(train_idx | eval_idx) == len(docs)
  assert 0 < len(eval_idx) < 0.05 * len(docs)
  tok = tokenizers.ByteTokenizer()
  lay = pipeline.layout(cfg, 0, 1)
  ds = pipeline.train_dataset(cfg, tok, train_docs, lay)
  it = iter(ds)
  first = _batches(it, 3)
  state = it.get_state()
  after = _batches(it, 3)
  it2 = iter(ds)
  again = _batches(it2, 3)
  it3 = iter(ds)
  it3.set_state(state)
  resumed = _batches(it3, 3)
  for a, b in zip(first + after, again + resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  b = first[0]
  assert b["tokens"].shape == b["segment_ids"].shape == b["positions"].shape == (4, 17)
  # Positions restart at 0 at every new segment and at row start.
  seg, pos = b["segment_ids"], b["positions"]
  starts = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  assert np.all(pos[starts] == 0)
  assert np.all(pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1)
  for x in (it, it2, it3):
    x.close()


def test_processes_read_disjoint_shards_that_union_to_one_process():
  cfg = DataConfig(seq_len=16, global_batch_size=4, num_shards=2, prefetch=0)
  docs = sources.split_text(sources.embedded_text()[:200_000], "paragraph")
  tok = tokenizers.ByteTokenizer()
  whole = next(iter(pipeline.train_dataset(cfg, tok, docs, pipeline.layout(cfg, 0, 1))))
  p0 = next(iter(pipeline.train_dataset(cfg, tok, docs, pipeline.layout(cfg, 0, 2))))
  p1 = next(iter(pipeline.train_dataset(cfg, tok, docs, pipeline.layout(cfg, 1, 2))))
  np.testing.assert_array_equal(whole["tokens"], np.concatenate([p0["tokens"], p1["tokens"]]))


def test_file_formats_directory_and_glob(tmp_path):
  (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n" +
                                    json.dumps({"text": "fourth"}) + "\n")
  from array_record.python import array_record_module
  w = array_record_module.ArrayRecordWriter(str(tmp_path / "c.array_record"), "group_size:1")
  w.write(b"fifth")
  w.close()
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["sixth"]}), tmp_path / "d.parquet")
    expected = 6
  except ImportError:
    expected = 5
  docs = sources.documents(DataConfig(path=str(tmp_path)))
  got = sorted(docs[i].strip() for i in range(len(docs)))
  assert len(got) == expected and {"first doc", "third", "fifth"} <= set(got)
  docs = sources.documents(DataConfig(path=str(tmp_path / "*.jsonl")))
  assert [docs[i] for i in range(len(docs))] == ["third", "fourth"]


def test_clear_errors_for_missing_and_empty_data(tmp_path):
  with pytest.raises(ConfigError, match="data.path.*no such file"):
    sources.documents(DataConfig(path=str(tmp_path / "nope.txt")))
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(ConfigError, match="no documents"):
    sources.documents(DataConfig(path=str(tmp_path / "empty.txt")))
  (tmp_path / "x.jsonl").write_text('{"body": "x"}\n')
  with pytest.raises(ConfigError, match="data.text_field"):
    sources.documents(DataConfig(path=str(tmp_path / "x.jsonl")))
  with pytest.raises(ConfigError, match="data.tokenizer_path.*not found"):
    tokenizers.load("sentencepiece", str(tmp_path / "missing.model"))


def test_huggingface_tokenizer_file(tmp_path):
  tk = pytest.importorskip("tokenizers")
  tok = tk.Tokenizer(tk.models.WordLevel({"[UNK]": 0, "to": 1, "be": 2}, unk_token="[UNK]"))
  tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  t = tokenizers.load("huggingface", str(tmp_path / "tokenizer.json"))
  assert t.vocab_size == 3
  np.testing.assert_array_equal(t.encode("to be or"), [1, 2, 0])


def test_byte_tokenizer_round_trip():
  t = tokenizers.ByteTokenizer()
  assert t.decode(t.encode("Thou art — café")) == "Thou art — café"


def test_iterator_state_is_per_shard_and_moves_between_process_counts():
  cfg = DataConfig(seq_len=16, global_batch_size=8, num_shards=4, prefetch=0)
  tok = tokenizers.ByteTokenizer()
  docs, _ = pipeline.split(sources.documents(cfg), cfg.eval_fraction)
  # Four processes (one shard each) run two steps; their states are merged by shard id.
  states = {}
  for p in range(4):
    it = iter(pipeline.train_dataset(cfg, tok, docs, pipeline.layout(cfg, p, 4)))
    _batches(it, 2)
    states.update(it.get_state())
  assert sorted(states) == ["0", "1", "2", "3"]
  # One process owning all four shards resumes from them: the same next batch as a run that
  # never stopped.
  whole = iter(pipeline.train_dataset(cfg, tok, docs, pipeline.layout(cfg, 0, 1)))
  expected = _batches(whole, 3)[2]
  resumed = iter(pipeline.train_dataset(cfg, tok, docs, pipeline.layout(cfg, 0, 1)))
  resumed.set_state(states)
  got = next(resumed)
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k])
  with pytest.raises(ValueError, match="no entry for shards"):
    resumed.set_state({"0": states["0"]})


def test_checkpointed_data_state_names_a_changed_shard_count(tmp_path):
  from etils import epath

  from train import checkpoint
  tok = tokenizers.ByteTokenizer()
  two = DataConfig(seq_len=16, global_batch_size=8, num_shards=2, prefetch=0)
  docs, _ = pipeline.split(sources.documents(two), two.eval_fraction)
  it = iter(pipeline.train_dataset(two, tok, docs, pipeline.layout(two, 0, 1)))
  _batches(it, 1)
  handler, directory = checkpoint.ShardedDataHandler(), epath.Path(tmp_path)
  handler.save(directory, checkpoint.DataSave(it))
  assert sorted(p.name for p in directory.iterdir()) == ["shard_0-of-2.json", "shard_1-of-2.json"]
  again = iter(pipeline.train_dataset(two, tok, docs, pipeline.layout(two, 0, 1)))
  handler.restore(directory, checkpoint.DataRestore(again))
  np.testing.assert_array_equal(next(again)["tokens"], next(it)["tokens"])
  four = DataConfig(seq_len=16, global_batch_size=8, num_shards=4, prefetch=0)
  other = iter(pipeline.train_dataset(four, tok, docs, pipeline.layout(four, 0, 1)))
  with pytest.raises(ConfigError, match="data.num_shards=2"):
    handler.restore(directory, checkpoint.DataRestore(other))
