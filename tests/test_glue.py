"""GLUE: the loader (GLUE TSVs and save_to_disk folders, a local WordPiece tokenizer, dict batches), the metrics
(against sklearn / scipy), the shipped specs (against torchdistill's official configs) and the distillation terms'
parity with what torchdistill 1.1.5's GLUE study trained (its call path: targets=None)."""
from __future__ import annotations

import random

import datasets
import numpy as np
import pytest
import torch
import transformers
from scipy import stats
from sklearn import metrics as skm
from torchdistill.core.forward_hook import ForwardHookManager
from torchdistill.losses.registry import get_high_level_loss
from torchdistill.losses.util import extract_model_loss_dict

import kdgraph
from kdgraph.errors import DataError
from kdgraph.methods.registry import LOSSES
from kdgraph.train.data import build_datasets, check_data, make_loader
from kdgraph.train.data.glue import GLUE_TASKS, glue_splits
from kdgraph.train.glue_metrics import glue_metrics, matthews_corr, pearson, spearman

from conftest import SPECS

WORDS = "the a cat dog sat on mat is good bad not very movie film was and it".split()
# torchdistill's configs/official/glue/yoshitomo-matsubara/nlp-oss2023/<task>/kd/
# bert_base_uncased_from_bert_large_uncased.yaml: epochs, batch, lr, temperature, alpha (None: STS-B's MSE)
TORCHDISTILL = {"cola": (3, 16, 1e-4, 7.0, 0.9), "sst2": (3, 32, 1e-4, 3.0, 0.9), "mrpc": (5, 16, 1e-4, 11.0, 0.9),
                "stsb": (3, 32, 3e-5, None, None), "qqp": (3, 32, 1e-4, 5.0, 0.9), "mnli": (3, 32, 1e-4, 5.0, 0.9),
                "qnli": (3, 32, 5e-5, 1.0, 0.5), "rte": (3, 32, 1e-4, 5.0, 0.9), "wnli": (5, 32, 1e-4, 5.0, 0.9)}
HEADERS = {"sst2": ["sentence", "label"], "mrpc": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
           "stsb": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                    "score"],
           "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
           "mnli": ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
           "qnli": ["index", "question", "sentence", "label"], "rte": ["index", "sentence1", "sentence2", "label"],
           "wnli": ["index", "sentence1", "sentence2", "label"]}
TEXT = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("#1 String", "#2 String"), "qqp": ("question1", "question2"),
        "qnli": ("question", "sentence")}
LABEL = {"sst2": "label", "mrpc": "Quality", "stsb": "score", "qqp": "is_duplicate", "mnli": "gold_label",
         "qnli": "label", "rte": "label", "wnli": "label"}
NAMES = {"mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
         "rte": ["entailment", "not_entailment"]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d / "saved"))
    return str(d / "saved")


def _sentence(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))


def _rows(task, n, seed):
    """``(texts, label id or score)`` per example, drawn at random."""
    rng = random.Random(seed)
    k = GLUE_TASKS[task][2]
    n_texts = len(GLUE_TASKS[task][1])
    return [(tuple(_sentence(rng) for _ in range(n_texts)), round(rng.uniform(0, 5), 3) if k == 1
             else rng.randrange(k)) for _ in range(n)]


def _write_tsv(folder, task, split_file, rows):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    if task == "cola":
        lines = [f"gj04\t{y}\t\t{t[0]}" for t, y in rows]
    else:
        header = HEADERS[task]
        lines.append("\t".join(header))
        text_cols = TEXT.get(task, ("sentence1", "sentence2"))
        for i, (t, y) in enumerate(rows):
            row = dict.fromkeys(header, "x")
            row.update(zip(text_cols, t))
            row[LABEL[task]] = NAMES[task][y] if task in NAMES else str(y)
            row["index"] = str(i)
            lines.append("\t".join(row[h] for h in header))
    (folder / split_file).write_text("\n".join(lines) + "\n")


def _tsv_copy(root, task, n_train=12, n_val=6):
    train, val = _rows(task, n_train, 1), _rows(task, n_val, 2)
    folder = root / GLUE_TASKS[task][0]
    _write_tsv(folder, task, "train.tsv", train)
    _write_tsv(folder, task, "dev_matched.tsv" if task == "mnli" else "dev.tsv", val)
    if task == "mnli":
        _write_tsv(folder, task, "dev_mismatched.tsv", _rows(task, 5, 3))
    return train, val


def _expected(tok_dir, texts, max_length=128):
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    return tok(*zip(*texts), truncation=True, max_length=max_length)["input_ids"]


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_glue_tsv_files_load_as_tokenized_dict_batches(tmp_path, tokenizer_dir, task):
    train, val = _tsv_copy(tmp_path, task)
    val_name = "validation_matched" if task == "mnli" else "validation"
    splits = glue_splits(str(tmp_path), task, tokenizer_dir, splits=("train", val_name))
    assert len(splits["train"]) == 12 and len(splits[val_name]) == 6
    batch = splits["train"].get_batch([0, 3, 5])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    expected = _expected(tokenizer_dir, [train[i][0] for i in (0, 3, 5)])
    width = max(len(e) for e in expected)
    assert batch["input_ids"].shape == (3, width) and batch["input_ids"].dtype == torch.int64
    for row, ids, mask in zip(expected, batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        assert ids[: len(row)] == row and ids[len(row):] == [0] * (width - len(row))
        assert mask == [1] * len(row) + [0] * (width - len(row))
    if GLUE_TASKS[task][1][1:]:  # a sentence pair: the second segment has token type 1
        assert batch["token_type_ids"].max() == 1
    labels = [train[i][1] for i in (0, 3, 5)]
    if task == "stsb":
        assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == pytest.approx(labels)
    else:
        assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == labels


def test_save_to_disk_folder_and_max_length_padding(tmp_path, tokenizer_dir):
    rows = {s: _rows("mrpc", n, seed) for s, n, seed in (("train", 10, 4), ("validation", 4, 5))}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({
        "sentence1": [t[0] for t, _ in r], "sentence2": [t[1] for t, _ in r], "label": [y for _, y in r],
        "idx": list(range(len(r)))}) for s, r in rows.items()})
    dd.save_to_disk(str(tmp_path / "mrpc"))
    splits = glue_splits(str(tmp_path), "mrpc", tokenizer_dir, max_length=12, padding="max_length")
    batch = splits["validation"].get_batch([0, 1, 2, 3])
    assert batch["input_ids"].shape == (4, 12)
    assert batch["input_ids"].tolist() == [e + [0] * (12 - len(e)) for e in
                                           _expected(tokenizer_dir, [t for t, _ in rows["validation"]], 12)]
    assert batch["labels"].tolist() == [y for _, y in rows["validation"]]


def test_pad_to_multiple_of_rounds_each_batch_up_like_the_collator(tmp_path, tokenizer_dir):
    train, _ = _tsv_copy(tmp_path, "rte")
    plain = glue_splits(str(tmp_path), "rte", tokenizer_dir, splits=("train",))["train"]
    eight = glue_splits(str(tmp_path), "rte", tokenizer_dir, splits=("train",), pad_to_multiple_of=8)["train"]
    collator = transformers.DataCollatorWithPadding(transformers.AutoTokenizer.from_pretrained(tokenizer_dir),
                                                    pad_to_multiple_of=8)
    for idx in ([0, 1, 2], [3], list(range(12))):
        a, b = plain.get_batch(idx), eight.get_batch(idx)
        ref = collator([{k: plain.encoded[k][i] for k in plain.encoded} for i in idx])
        assert b["input_ids"].shape[1] % 8 == 0 and b["input_ids"].shape[1] < a["input_ids"].shape[1] + 8
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(b[key], ref[key]), key


def _spec(task, root, tok, num_classes=None):
    k = GLUE_TASKS[task][2]
    cfg = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 20, "vocab_size": 30, "num_labels": k}
    net = {"model": "hf:AutoModelForSequenceClassification", "kwargs": {"config": cfg}}
    return kdgraph.load_spec({
        "name": "g", "input": {"num_classes": num_classes or k, "named": {"input_ids": {"shape": [16], "dtype": "int64",
                                                                                          "high": 30}}},
        "teacher": net, "student": net,
        "stages": [{"name": "main", "batch_size": 4, "optimizer": {"type": "adamw", "lr": 1e-4},
                    "losses": [{"type": "cross_entropy"}]}],
        "data": {"dataset": "glue", "task": task, "root": str(root), "tokenizer": tok, "workers": 0}})


def test_the_trainers_bundle_and_loader_give_dict_batches(tmp_path, tokenizer_dir):
    _tsv_copy(tmp_path, "mnli", n_train=9)
    bundle = build_datasets(_spec("mnli", tmp_path, tokenizer_dir))
    assert len(bundle.train) == 9 and len(bundle.val) == 6 and "GLUE mnli" in bundle.description
    loader = make_loader(bundle.train, batch_size=4, train=True, workers=0, seed=0)
    batches = list(loader)
    assert len(batches) == 2 and all(isinstance(b, dict) and b["labels"].shape == (4,) for b in batches)
    assert sorted(set(torch.cat([b["labels"] for b in batches]).tolist())) <= [0, 1, 2]


def test_missing_data_and_tokenizer_say_how_to_get_them(tmp_path, tokenizer_dir):
    with pytest.raises(DataError) as e:
        check_data(_spec("rte", tmp_path / "nowhere", tokenizer_dir))
    msg = str(e.value)
    assert "load_dataset('nyu-mll/glue', 'rte').save_to_disk" in msg and "AutoTokenizer.from_pretrained" in msg
    _tsv_copy(tmp_path, "rte")
    with pytest.raises(DataError, match="not a local tokenizer folder"):
        build_datasets(_spec("rte", tmp_path, "bert-base-uncased"))
    with pytest.raises(DataError, match=r"input.num_classes: GLUE rte has 2 classes but the spec says 3"):
        check_data(_spec("rte", tmp_path, tokenizer_dir, num_classes=3))
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=r"dev.tsv line 2: label 'maybe'"):
        build_datasets(_spec("rte", tmp_path, tokenizer_dir))


# ------------------------------------------------------------------ metrics


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    y2, p2 = rng.integers(0, 2, 200), rng.normal(size=(200, 2))
    y3, p3 = rng.integers(0, 3, 150), rng.normal(size=(150, 3))
    cola, mrpc, mnli = glue_metrics("cola", p2, y2), glue_metrics("mrpc", p2, y2), glue_metrics("mnli", p3, y3)
    assert cola["mcc"] == pytest.approx(skm.matthews_corrcoef(y2, p2.argmax(1)), abs=1e-12)
    assert mrpc["f1"] == pytest.approx(skm.f1_score(y2, p2.argmax(1)), abs=1e-12)
    assert mrpc["accuracy"] == pytest.approx(skm.accuracy_score(y2, p2.argmax(1)), abs=1e-12)
    assert mnli["accuracy"] == pytest.approx(skm.accuracy_score(y3, p3.argmax(1)), abs=1e-12)
    assert matthews_corr(p3.argmax(1), y3) == pytest.approx(skm.matthews_corrcoef(y3, p3.argmax(1)), abs=1e-12)
    scores = np.round(rng.uniform(0, 5, 100), 1)  # ties, as STS-B's scores have
    out = scores + rng.normal(size=100)
    sts = glue_metrics("stsb", out[:, None], scores)
    assert sts["pearson"] == pytest.approx(stats.pearsonr(out, scores)[0], abs=1e-12)
    assert sts["spearman"] == pytest.approx(stats.spearmanr(out, scores)[0], abs=1e-12)
    assert spearman(np.round(out), scores) == pytest.approx(stats.spearmanr(np.round(out), scores)[0], abs=1e-12)
    assert sts["score"] == pytest.approx((sts["pearson"] + sts["spearman"]) / 2)


def test_metric_edge_cases_match_sklearn():
    y = np.array([0, 1, 1, 0, 1])
    const = np.zeros(5, dtype=int)
    assert matthews_corr(const, y) == skm.matthews_corrcoef(y, const) == 0.0
    assert glue_metrics("qqp", np.stack([np.ones(5), np.zeros(5)], 1), y)["f1"] == 0.0  # never predicts 1
    assert skm.f1_score(y, const, zero_division=0) == 0.0
    assert matthews_corr(y, y) == 1.0 and matthews_corr(1 - y, y) == pytest.approx(skm.matthews_corrcoef(y, 1 - y))
    assert np.isnan(pearson(np.ones(5), np.arange(5.0))) and np.isnan(spearman(np.arange(5.0), np.ones(5)))
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_metrics("squad", y, y)


# ------------------------------------------------------------------ specs and torchdistill parity


def _glue_spec(task):
    return kdgraph.load_spec(SPECS / "glue" / f"{task}.yaml")


def test_every_task_has_a_spec_with_torchdistills_recipe():
    assert sorted(p.stem for p in (SPECS / "glue").glob("*.yaml")) == sorted(GLUE_TASKS)
    for task, (epochs, batch, lr, temperature, alpha) in TORCHDISTILL.items():
        spec = _glue_spec(task)
        st = spec.stages[0]
        assert (st.epochs, st.batch_size, st.optimizer.type, st.optimizer.lr, st.optimizer.weight_decay) == \
            (epochs, batch, "adamw", lr, 0.0), task
        # optimizer_no_decay, get_linear_schedule_with_warmup(0 warm-up) stepped per step, max_grad_norm 1.0
        assert st.optimizer.no_decay == ["bias", "norm"] and st.clip_grad.max_norm == 1.0 and st.accumulate == 1
        s = st.scheduler
        assert (s.type, s.interval, s.warmup_steps, s.warmup_epochs, s.min_lr) == ("linear", "step", 0, 0.0, 0.0)
        assert spec.data.pad_to_multiple_of == 8 and spec.runtime.amp == "fp16"
        assert spec.data.dataset == "glue" and spec.data.task == task
        assert spec.input.num_classes == GLUE_TASKS[task][2] == spec.student.kwargs["config"]["num_labels"]
        t, s = spec.teacher.kwargs["config"], spec.student.kwargs["config"]
        assert (t["num_hidden_layers"], t["hidden_size"], t["num_attention_heads"], t["intermediate_size"]) == \
            (24, 1024, 16, 4096)
        assert (s["num_hidden_layers"], s["hidden_size"], s["num_attention_heads"], s["intermediate_size"]) == \
            (12, 768, 12, 3072)
        assert f"nlp-oss2023/{task}/kd/bert_base_uncased_from_bert_large_uncased.yaml" in spec.description
        assert spec.reference.metrics and spec.reference.teacher_metrics
        terms = {loss.type: loss for loss in st.losses}
        if alpha is None:
            assert terms["mse"].args == {"reduction": "sum"} and set(terms) == {"mse", "regression_mse"}
        else:  # what the study's script trained: the softened KL alone (targets=None), not the config's alpha mix
            assert set(terms) == {"kd"} and terms["kd"].weight == 1.0
            assert terms["kd"].args == {"temperature": temperature, "t_squared": False}


def _spec_loss(spec, **tensors):
    """The weighted sum of the spec's loss terms, built from the registry with the spec's args."""
    total = 0.0
    for loss in spec.stages[0].losses:
        cls = LOSSES.get(loss.type)
        module = cls(**loss.args)
        total = total + loss.weight * module(**{k: tensors[k] for k in cls.inputs if k in tensors})  # optional inputs unbound
    return total


def _criterion(task, temperature, alpha):
    """The criterion of torchdistill's official config for ``task`` (nlp-oss2023/<task>/kd/...yaml), as its
    ``criterion`` section says."""
    if alpha is None:
        return get_high_level_loss({"key": "WeightedSumLoss", "kwargs": {"model_term": {"weight": 1.0}, "sub_terms": {
            "mse": {"criterion": {"key": "MSELoss", "kwargs": {"reduction": "sum"}},
                    "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                        "input": {"is_from_teacher": False, "module_path": "classifier", "io": "output"},
                        "target": {"is_from_teacher": True, "module_path": "classifier", "io": "output"}}},
                    "weight": 1.0}}}})
    return get_high_level_loss({"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": {
        "key": "KDLoss", "kwargs": {"student_module_path": "classifier", "student_module_io": "output",
                                    "teacher_module_path": "classifier", "teacher_module_io": "output",
                                    "temperature": temperature, "alpha": alpha, "reduction": "batchmean"}},
        "weight": 1.0}}}})


@pytest.mark.parametrize("task", sorted(TORCHDISTILL))
def test_each_specs_total_loss_is_the_objective_torchdistills_study_trained(task):
    """torchdistill's own call path, as examples/hf_transformers/text_classification.py runs it: forward hooks on
    both models' 'classifier' (ForwardHookManager), the student called with the batch as kwargs (labels included:
    the model computes its own loss), then ``criterion(io_dict, model_loss_dict, targets=None)`` with the
    official config's criterion; STS-B's model loss through the example's extract_transformers_loss
    (``{'loss': outputs.loss}``). The spec's terms on the same tapped logits give the same value and gradients
    (rtol 1e-5), on tiny BERT configs (torchdistill 1.1.5, examples at commit 3e4373c4)."""
    _, _, _, temperature, alpha = TORCHDISTILL[task]
    k = GLUE_TASKS[task][2]
    torch.manual_seed(len(task))
    cfg = transformers.AutoConfig.for_model("bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=20, vocab_size=30, num_labels=k, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0)
    student = transformers.AutoModelForSequenceClassification.from_config(cfg).train()
    teacher = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    with torch.no_grad():  # logits of a few units, as a fine-tuned classifier's (a tiny random BERT's are ~0.1)
        student.classifier.weight.normal_(0.0, 3.0)
        teacher.classifier.weight.normal_(0.0, 3.0)
    ids = torch.randint(0, 30, (8, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.rand(8) * 5 if k == 1 else torch.randint(0, k, (8,))}
    s_hooks, t_hooks = ForwardHookManager("cpu"), ForwardHookManager("cpu")  # the box's student / teacher hooks
    s_hooks.add_hook(student, "classifier", requires_input=False, requires_output=True)
    t_hooks.add_hook(teacher, "classifier", requires_input=False, requires_output=True)
    with torch.no_grad():
        teacher(**batch)
    outputs = student(**batch)
    io_dict = {"teacher": t_hooks.pop_io_dict(), "student": s_hooks.pop_io_dict()}
    s_hooks.clear()
    t_hooks.clear()
    model_loss_dict = {"loss": outputs.loss} if alpha is None else extract_model_loss_dict(outputs, None)
    expected = _criterion(task, temperature, alpha)(io_dict, model_loss_dict, None)
    expected.backward()
    ref_grad = student.classifier.weight.grad.clone()
    student.zero_grad()
    logits, t_logits = io_dict["student"]["classifier"]["output"], io_dict["teacher"]["classifier"]["output"]
    assert torch.equal(logits, outputs.logits)
    logits = student(**{k_: v for k_, v in batch.items() if k_ != "labels"}).logits
    ours = _spec_loss(_glue_spec(task), logits=logits, predictions=logits, targets=batch["labels"], student=logits,
                      teacher=t_logits)
    ours.backward()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(student.classifier.weight.grad, ref_grad, rtol=1e-5, atol=1e-8)
    if alpha is not None:  # the config as written would have trained something else
        with_labels = _criterion(task, temperature, alpha)(io_dict, model_loss_dict, batch["labels"])
        assert with_labels.item() != pytest.approx(expected.item(), rel=1e-3)


def _tiny_glue_spec(tmp_path, tokenizer_dir, epochs=2):
    """A tiny BERT pair (hf: models, inline configs) on MRPC TSV files in tmp_path, as a spec file."""
    import yaml

    _tsv_copy(tmp_path / "data", "mrpc", n_train=16, n_val=8)

    def cfg(layers, hidden):
        return {"model_type": "bert", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
                "intermediate_size": 2 * hidden, "vocab_size": 64, "num_labels": 2, "max_position_embeddings": 64,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # DDP below: no random masks

    named = {k: {"shape": [32], "dtype": "int64", "high": 64 if k == "input_ids" else 2}
             for k in ("input_ids", "attention_mask", "token_type_ids")}
    spec = {"name": "tiny_glue", "input": {"num_classes": 2, "named": named},
            "teacher": {"model": "hf:AutoModelForSequenceClassification", "kwargs": {"config": cfg(2, 32)}},
            "student": {"model": "hf:AutoModelForSequenceClassification", "kwargs": {"config": cfg(1, 16)}},
            "stages": [{"name": "main", "epochs": epochs, "batch_size": 4, "optimizer": {"type": "adamw", "lr": 1e-3},
                        "losses": [{"name": "ce", "type": "cross_entropy", "weight": 0.9,
                                    "inputs": {"logits": "student:classifier"}},
                                   {"name": "kd", "type": "kd", "weight": 0.1, "args": {"temperature": 4.0},
                                    "inputs": {"student": "student:classifier", "teacher": "teacher:classifier"}}]}],
            "data": {"dataset": "glue", "task": "mrpc", "root": str(tmp_path / "data"), "tokenizer": tokenizer_dir,
                     "workers": 0, "max_length": 32}}
    path = tmp_path / "tiny_glue.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_kdgraph_train_distils_a_tiny_bert_pair_on_glue_tsv_files_and_reports_the_task_metrics(tmp_path,
                                                                                             tokenizer_dir):
    """End to end through the CLI: TSV files and a tokenizer folder on disk, `hf:` models from inline configs,
    captured with torch.export (named inputs), trained 2 epochs by `kdgraph train`; the F1 / accuracy it reports
    are recomputed here from the checkpoint's student on the validation split."""
    import json
    import subprocess
    import sys

    import yaml

    from kdgraph.train.checkpoint import Checkpoint
    from kdgraph.train.glue_metrics import glue_metrics

    path = _tiny_glue_spec(tmp_path, tokenizer_dir)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "kdgraph", "train", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "main epoch 2/2: f1 " in proc.stdout and "accuracy " in proc.stdout and "GLUE mrpc score" in proc.stdout
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "eval"]
    assert len(evals) == 2 and evals[-1]["images"] == 8

    # the last evaluation, recomputed: the checkpoint's student on the validation split's dict batches
    loaded = kdgraph.load_spec(path)
    student = kdgraph.models.build_model(loaded.student, "student")
    student.load_state_dict(Checkpoint.load(out / "last.pt").weights("student"))
    val = glue_splits(str(tmp_path / "data"), "mrpc", tokenizer_dir, max_length=32, splits=("validation",))
    batch = val["validation"].get_batch(list(range(8)))
    with torch.no_grad():
        logits = student.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = glue_metrics("mrpc", logits.numpy(), batch["labels"].numpy())
    assert evals[-1]["f1"] == pytest.approx(100 * expected["f1"], abs=1e-4)
    assert evals[-1]["accuracy"] == pytest.approx(100 * expected["accuracy"], abs=1e-4)


def test_two_gloo_processes_train_the_bert_pair_like_one_process(tmp_path, tokenizer_dir):
    """DDP with dict batches: 2 processes x 4 examples end with the student one process reaches with batches of 8
    (BERT normalises per example, and each half batch is padded to its own longest sequence under the mask)."""
    import os
    import subprocess
    import sys

    from kdgraph.train import train
    from kdgraph.train.checkpoint import Checkpoint

    path = _tiny_glue_spec(tmp_path, tokenizer_dir, epochs=1)
    # SGD: Adam's normalised step turns a ~1e-9 difference in a rarely used embedding row's gradient into +-lr
    sgd = ["stages.main.optimizer.type=sgd", "stages.main.optimizer.lr=0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdgraph",
           "train", str(path), "--out", str(tmp_path / "two"), "--device", "cpu", "--no-progress",
           "--set", "stages.main.reference_world_size=2", *[a for o in sgd for a in ("--set", o)]]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 processes (gloo)" in proc.stdout and "effective batch 8" in proc.stdout
    one = train(kdgraph.load_spec(path, overrides=["stages.main.batch_size=8", *sgd]),
                out=tmp_path / "one", device="cpu", progress=False, plot=False, tensorboard=False)
    assert one["stages"][0]["effective_batch"] == 8 and one["stages"][0]["lr_used"] == 0.5  # lr x 2 / 2 in both
    a, b = Checkpoint.load(tmp_path / "one" / "last.pt"), Checkpoint.load(tmp_path / "two" / "last.pt")
    assert a.global_step == b.global_step == 2
    for k, v in a.student.items():
        torch.testing.assert_close(b.student[k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
