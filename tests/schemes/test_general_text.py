"""distill.general: general text distilled on every token beside the task, from a file or from the teacher's own
samples (data-free), on the tiny model through the hf backend's trainer."""

import json

import pytest
import torch

from qatkit.pipeline import run_recipe
from qatkit.recipe import load_recipe

from ..conftest import TINY_RECIPE, arith_texts, send_sigterm, stopped_early


def tiny_recipe(model_dir, *overrides):
    return load_recipe(TINY_RECIPE, [f"model.name_or_path={model_dir}", "train.max_steps=2", *overrides])


def no_task(text_file) -> list[str]:
    """A recipe with no task: the file's text trained on every token by self-distillation; held-out items from
    eval_path."""
    return [
        f"data.path={text_file}",
        "data.format=text",
        "data.text_field=body",
        "data.eval_path=tests/data/arith_mc.jsonl",
        "data.eval_size=16",
        "data.train_size=null",
        "distill.teacher=base",
        "distill.tokens=all",
    ]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "general.jsonl"
    texts = [t[: 12 + 3 * i] for i, t in enumerate(arith_texts()[:40])]  # of many lengths: batches need padding
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    return path


def _trainer(recipe, tmp_path, general):
    from qatkit.backends.hf import load_teacher
    from qatkit.backends.trainer import qat_trainer_class, sft_trainer
    from qatkit.data import load_splits, training_examples
    from qatkit.models.assembly import attach_lora, prepare_for_qat
    from qatkit.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(recipe.model)
    prepare_for_qat(recipe, model)
    model = attach_lora(recipe, model)
    teacher = load_teacher(recipe, None)
    rows = training_examples(load_splits(recipe.data), recipe.data.answer_style)
    trainer_class = qat_trainer_class(model, None, teacher, recipe.distill, general(teacher, tokenizer))
    trainer = sft_trainer(trainer_class, recipe, model, tokenizer, rows, tmp_path / "ckpt", True, True)
    return trainer, model, teacher, next(iter(trainer.get_train_dataloader()))


def test_the_loss_adds_the_kl_on_every_token_of_a_general_batch(tiny_model_dir, tmp_path, text_file):
    """Task loss (here weight 0: the cross-entropy) + general.weight × KL(teacher || student) over every real token
    of the next general batch: share 0.5 of a batch of 8 is 4 sequences, padding excluded."""
    from transformers import Trainer

    from qatkit.backends.distill import distill_loss
    from qatkit.backends.general_text import general_batches

    recipe = tiny_recipe(
        tiny_model_dir,
        "distill.teacher=base",
        "distill.weight=0",
        f"distill.general.path={text_file}",
        "distill.general.field=body",
        "distill.general.weight=2",
        "distill.general.max_tokens=64",
    )
    spec = recipe.distill.general

    def stream(teacher, tokenizer):
        return general_batches(spec, teacher, tokenizer, recipe.train.batch_size, 7, {})

    trainer, model, teacher, inputs = _trainer(recipe, tmp_path, stream)
    expected_batch = stream(teacher, trainer.processing_class).next()
    assert expected_batch["input_ids"].shape[0] == 4 and not expected_batch["attention_mask"].all()
    with torch.no_grad():
        ce = Trainer.compute_loss(trainer, model, inputs).item()
        kl = distill_loss(
            model(**expected_batch).logits,
            teacher(**expected_batch).logits,
            expected_batch["attention_mask"][:, 1:].bool(),
        ).item()
        loss = trainer.compute_loss(model, inputs).item()
    assert kl > 0
    assert loss == pytest.approx(ce + 2 * kl, rel=1e-5)


def test_the_general_text_can_have_its_own_teacher(tiny_model_dir, tmp_path, text_file):
    """distill.general.teacher: base beside distill.teacher: control: the task's KL is to the control, the general
    text's to the base model (what the model could do before the fine-tune moved it); control: to the control, as
    when unset. Either teacher being the control means the control is trained first."""
    from qatkit.backends.distill import distill_loss
    from qatkit.backends.general_text import general_batches
    from qatkit.backends.hf import GeneralText, HFBackend
    from qatkit.data import load_splits, training_examples
    from qatkit.models.assembly import attach_lora, load_finetuned
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.stages.finetune import needs_control_first

    general = [f"distill.general.{k}" for k in (f"path={text_file}", "field=body", "weight=2", "max_tokens=64")]
    recipes = {
        teacher: tiny_recipe(tiny_model_dir, "distill.teacher=control", *general, f"distill.general.teacher={teacher}")
        for teacher in ("base", "control")
    }
    control = tmp_path / "control"
    torch.manual_seed(0)
    with_adapter = attach_lora(recipes["base"], load_model_and_tokenizer(recipes["base"].model)[0])
    with torch.no_grad():
        for name, p in with_adapter.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)  # a control far from the base
    with_adapter.save_pretrained(control)
    teachers = {
        "base": load_model_and_tokenizer(recipes["base"].model)[0],
        "control": load_finetuned(recipes["base"], control)[0],
    }
    examples = training_examples(load_splits(recipes["base"].data), recipes["base"].data.answer_style)

    general_kl = {}
    for name, recipe in recipes.items():
        work = tmp_path / f"work-{name}"
        work.mkdir()
        trainer, model, tokenizer = HFBackend().trainer(recipe, examples, work, False, True, control)
        inputs = next(iter(trainer.get_train_dataloader()))
        task = {k: v for k, v in inputs.items() if k != "labels"}
        text = general_batches(recipe.distill.general, None, tokenizer, recipe.train.batch_size, recipe.train.seed, {})
        text = text.next()
        with torch.no_grad():
            answers = inputs["labels"][:, 1:] != -100
            task_kl = distill_loss(model(**task).logits, teachers["control"](**task).logits, answers)
            general_kl[name] = distill_loss(
                model(**text).logits, teachers[name](**text).logits, text["attention_mask"][:, 1:].bool()
            )
            loss = trainer.compute_loss(model, inputs)
        assert loss.item() == pytest.approx(task_kl.item() + 2 * general_kl[name].item(), rel=1e-5)
        assert GeneralText(recipe, None, tokenizer, control).identity["teacher"] == name  # keys its teacher samples
    assert general_kl["control"] > 1.5 * general_kl["base"]  # the control is far from the base

    assert needs_control_first(recipes["base"])
    assert needs_control_first(
        tiny_recipe(tiny_model_dir, "distill.teacher=base", *general, "distill.general.teacher=control")
    )
    assert not needs_control_first(tiny_recipe(tiny_model_dir, "distill.teacher=base", *general))


def test_general_text_pools_the_head_of_every_source(text_file, tmp_path):
    """distill.general.mix: path's first `docs` documents, then each mix source's (all of them without `docs`)."""
    from qatkit.backends.general_text import corpus
    from qatkit.recipe.schema import GeneralTextSpec

    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(json.dumps({"passage": f"passage {i}", "body": "not this field"}) + "\n" for i in range(4))
    )
    first = [json.loads(line)["body"] for line in text_file.read_text().splitlines()]
    spec = GeneralTextSpec(
        path=str(text_file),
        field="body",
        docs=5,
        mix=[{"path": str(other), "field": "passage", "docs": 2}, {"path": str(other), "field": "passage"}],
    )
    assert corpus(spec) == [*first[:5], "passage 0", "passage 1", *(f"passage {i}" for i in range(4))]


def test_general_batches_cycle_through_every_sequence_before_repeating():
    from qatkit.backends.general_text import GeneralBatches

    stream = GeneralBatches([[1, 2], [3, 4, 5], [6, 7], [8, 9, 10, 11], [12, 13]], batch_size=2, pad_id=0, seed=1)
    seen = []
    for _ in range(5):  # two passes of 5 sequences, 2 at a time
        batch = stream.next()
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True):
            seen.append(tuple(i for i, m in zip(ids, mask, strict=True) if m))
    assert sorted(seen[:5]) == sorted(seen[5:]) == [(1, 2), (3, 4, 5), (6, 7), (8, 9, 10, 11), (12, 13)]


def test_packed_general_text_fills_every_sequence_and_keeps_every_document_whole(tiny_model_dir, text_file):
    """distill.general.packing: each document plus one EOS, none cut at max_tokens, joined in a seeded order into
    sequences of exactly max_tokens (the last holds the remainder), so the batches carry no padding."""
    from qatkit.backends.general_text import corpus, general_batches
    from qatkit.models.loading import load_model_and_tokenizer

    recipe = tiny_recipe(
        tiny_model_dir,
        "distill.teacher=base",
        f"distill.general.path={text_file}",
        "distill.general.field=body",
        "distill.general.max_tokens=16",
        "distill.general.packing=true",
    )
    spec = recipe.distill.general
    tokenizer = load_model_and_tokenizer(recipe.model)[1]
    documents = [tokenizer(t).input_ids for t in corpus(spec)]
    assert max(map(len, documents)) > 16  # long ones would be cut without packing

    stream = general_batches(spec, None, tokenizer, recipe.train.batch_size, 7, {})
    lengths = [len(s) for s in stream.sequences]
    assert set(lengths[:-1]) == {16} and 1 < lengths[-1] <= 16
    joined = [t for s in stream.sequences for t in s]
    assert len(joined) == sum(len(d) + 1 for d in documents)
    eos, pieces = tokenizer.eos_token_id, [[]]
    for token in joined:  # the stream split after each EOS: the documents, whole
        pieces[-1].append(token)
        if token == eos:
            pieces.append([])
    assert pieces[-1] == [] and all(p.count(eos) == 1 for p in pieces[:-1])
    assert sorted(p[:-1] for p in pieces[:-1]) == sorted(documents)
    assert [p[:-1] for p in pieces[:-1]] != documents  # in a shuffled order
    batch = stream.next()
    assert batch["input_ids"].shape == (4, 16) and batch["attention_mask"].all()
    assert general_batches(spec, None, tokenizer, 8, 7, {}).sequences == stream.sequences  # seeded


def with_leading_bos(tokenizer):
    """The tokenizer made to start every text with BOS, as Gemma's does."""
    from tokenizers import processors

    tokenizer.bos_token = tokenizer.pad_token
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)]
    )
    return tokenizer


def test_for_a_model_that_needs_bos_every_packed_sequence_and_sample_starts_with_it(tiny_model_dir):
    """Gemma scores text only after BOS: packed general text starts each sequence with BOS (the documents' own
    dropped, so none doubles), and the teacher's samples are BOS, a random token, then greedy tokens."""
    from qatkit.backends import general_text
    from qatkit.models.loading import load_model_and_tokenizer

    recipe = tiny_recipe(
        tiny_model_dir, "distill.teacher=base", "distill.general.path=teacher", "distill.general.docs=6"
    )
    teacher, tokenizer = load_model_and_tokenizer(recipe.model)
    assert general_text.leading_bos(tokenizer) is None
    bos = general_text.leading_bos(with_leading_bos(tokenizer))
    assert bos is not None and tokenizer("a b").input_ids[0] == bos

    documents = [[bos, 5, 6, 7], [bos, 8, 9], [bos, 10, 11, 12, 13, 14]]
    sequences = general_text.packed(documents, 4, eos_id=2, seed=0, bos_id=bos)
    assert all(s[0] == bos and bos not in s[1:] for s in sequences)
    assert [len(s) for s in sequences] == [4, 4, 4, 4, 2]  # 3 + 3 + 3 + 3 + 1 of the 13 document tokens and EOSes
    assert sorted(t for s in sequences for t in s[1:]) == sorted([5, 6, 7, 2, 8, 9, 2, 10, 11, 12, 13, 14, 2])

    spec = recipe.distill.general.model_copy(update={"max_tokens": 12})
    samples = general_text.teacher_samples(spec, teacher, tokenizer, 0, {"m": "bos"})
    assert len(samples) == 6 and all(s[0] == bos and s[1] != bos for s in samples)
    assert len({s[1] for s in samples}) > 1  # random first tokens after BOS
    with torch.no_grad():
        for s in samples:
            for t in range(2, 2 + general_text.GREEDY_PREFIX):
                if t < len(s):
                    assert teacher(torch.tensor([s[:t]])).logits[0, -1].argmax().item() == s[t]


def test_teacher_samples_start_random_then_greedy_then_sampled_and_are_cached(tiny_model_dir, monkeypatch):
    """path: teacher (LLM-QAT): a random first token, GREEDY_PREFIX greedy tokens, then sampling; cached per
    model, settings and seed."""
    from qatkit.backends import general_text
    from qatkit.models.loading import load_model_and_tokenizer

    recipe = tiny_recipe(
        tiny_model_dir, "distill.teacher=base", "distill.general.path=teacher", "distill.general.docs=6"
    )
    spec = recipe.distill.general.model_copy(update={"max_tokens": 16})
    teacher, tokenizer = load_model_and_tokenizer(recipe.model)
    samples = general_text.teacher_samples(spec, teacher, tokenizer, 0, {"m": 1})
    assert len(samples) == 6 and all(2 <= len(s) <= 16 for s in samples)
    assert len({s[0] for s in samples}) > 1  # random first tokens
    with torch.no_grad():
        for s in samples:
            for t in range(1, 1 + general_text.GREEDY_PREFIX):
                if t < len(s):
                    assert teacher(torch.tensor([s[:t]])).logits[0, -1].argmax().item() == s[t]
    assert any(len(s) > 1 + general_text.GREEDY_PREFIX for s in samples)

    monkeypatch.setattr(general_text, "_sample", lambda *a, **k: pytest.fail("sampled again instead of the cache"))
    assert general_text.teacher_samples(spec, teacher, tokenizer, 0, {"m": 1}) == samples
    monkeypatch.undo()
    assert general_text.teacher_samples(spec, teacher, tokenizer, 1, {"m": 1}) != samples


def test_an_interrupted_draw_goes_on_from_its_last_batch_and_ends_as_an_uninterrupted_one(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Sampling is long on a CPU (~75 min for 4000): each batch is saved as it is drawn, in the cache and the run's
    folder; a draw killed after two batches goes on from the third on a fresh machine (an empty cache, the run's
    copy), and its samples are those of a draw never interrupted."""
    from qatkit.backends import general_text
    from qatkit.core.io import read_json
    from qatkit.models.loading import load_model_and_tokenizer

    recipe = tiny_recipe(
        tiny_model_dir, "distill.teacher=base", "distill.general.path=teacher", "distill.general.docs=7"
    )
    spec = recipe.distill.general.model_copy(update={"max_tokens": 12})
    teacher, tokenizer = load_model_and_tokenizer(recipe.model)
    uninterrupted = general_text.teacher_samples(spec, teacher, tokenizer, 0, {"m": 1}, batch_size=2)

    kept, sample, drawn = tmp_path / "run" / "teacher_samples", general_text._sample, []

    def killed_after_two_batches(*args):
        if len(drawn) == 2:
            raise KeyboardInterrupt
        drawn.append(args[2])
        return sample(*args)

    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path / "first-machine"))
    monkeypatch.setattr(general_text, "_sample", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        general_text.teacher_samples(spec, teacher, tokenizer, 0, {"m": 1}, kept, batch_size=2)
    [progress] = kept.glob("*.partial.json")
    assert read_json(progress)["sequences"] == uninterrupted[:4]

    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path / "fresh-machine"))
    monkeypatch.setattr(general_text, "_sample", lambda *args: drawn.append(args[2]) or sample(*args))
    assert general_text.teacher_samples(spec, teacher, tokenizer, 0, {"m": 1}, kept, batch_size=2) == uninterrupted
    assert drawn == [2, 2, 2, 1]  # two batches before the kill, the last two after it
    assert not list(kept.glob("*.partial.json")) and len(list(kept.glob("*.json"))) == 1


def test_a_stop_request_ends_the_draw_after_the_batch_it_came_in(tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while the teacher samples: the batch being drawn is finished and kept, then the draw ends
    with Interrupted (--resume goes on from there)."""
    from qatkit.backends import general_text
    from qatkit.core.io import read_json
    from qatkit.models.loading import load_model_and_tokenizer

    recipe = tiny_recipe(
        tiny_model_dir, "distill.teacher=base", "distill.general.path=teacher", "distill.general.docs=7"
    )
    spec = recipe.distill.general.model_copy(update={"max_tokens": 12})
    teacher, tokenizer = load_model_and_tokenizer(recipe.model)
    kept, sample, drawn = tmp_path / "run" / "teacher_samples", general_text._sample, []

    def stopped_in_the_second_batch(*args):
        drawn.append(args[2])
        if len(drawn) == 2:
            send_sigterm()
        return sample(*args)

    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(general_text, "_sample", stopped_in_the_second_batch)
    with stopped_early("4 of 7 sequences kept"):
        general_text.teacher_samples(spec, teacher, tokenizer, 0, {"m": 1}, kept, batch_size=2)
    assert drawn == [2, 2]
    [progress] = kept.glob("*.partial.json")
    assert len(read_json(progress)["sequences"]) == 4


def test_a_run_with_data_free_general_distillation(tiny_model_dir, tmp_path):
    """Through the pipeline: the QAT run distills on the teacher's own samples beside the task and converts; every
    step's loss is logged with its terms, which add up to it (two micro-batches a step)."""
    out = tmp_path / "run"
    overrides = [
        "train.grad_accum=2",
        "distill.teacher=base",
        "distill.weight=0.25",
        "distill.general.path=teacher",
        "distill.general.docs=8",
        "distill.general.weight=2",
    ]
    run_recipe(tiny_recipe(tiny_model_dir, *overrides), out, only=["finetune", "convert"])
    summary = json.loads((out / "finetune" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    for step in json.loads((out / "finetune" / "loss.json").read_text()):
        assert min(step["ce"], step["kl_task"], step["kl_general"]) > 0
        assert step["loss"] == pytest.approx(0.75 * step["ce"] + 0.25 * step["kl_task"] + 2 * step["kl_general"])
    assert "general text" in (out / "convert" / "README.md").read_text()


def test_a_recipe_with_no_task_trains_on_running_text_and_scores_held_out_items(tiny_model_dir, tmp_path, text_file):
    """data.format=text: every token of the text is trained on (no answer-only masking), here by pure
    self-distillation (KL to the unquantized model on every token); eval_path gives held-out items never trained on."""
    from datasets import Dataset

    from qatkit.backends.trainer import sft_config
    from qatkit.data import load_splits, training_examples

    recipe = tiny_recipe(tiny_model_dir, *no_task(text_file), "eval.baselines=[bf16,ptq]")
    splits = load_splits(recipe.data)
    assert len(splits.train) == 40 and len(splits.eval) == 16 and not splits.format_is_mc
    examples = training_examples(splits)
    assert examples[0].keys() == {"text"}

    from trl import SFTTrainer

    from qatkit.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(recipe.model)
    args = sft_config(recipe, tmp_path / "ckpt", model, use_cpu=True, qat=True)
    batch = next(
        iter(
            SFTTrainer(
                model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer
            ).get_train_dataloader()
        )
    )
    real = batch["attention_mask"].bool()
    assert (batch["labels"][real] != -100).all()  # every real token is a target

    out = tmp_path / "run"
    run_recipe(recipe, out, only=["finetune", "convert", "eval"])
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"bf16", "ptq", "qat"} <= set(results["variants"])
    assert json.loads((out / "finetune" / "train_summary.json").read_text())["steps"] == 2


def test_packing_joins_every_document_into_full_length_sequences(tiny_model_dir, tmp_path, text_file):
    """train.packing: the documents, each ended by EOS, fill sequences of exactly max_seq_length with no padding and
    no token lost (long ones are not cut), and the distillation trainer trains on them."""
    from trl import SFTTrainer

    from qatkit.backends.trainer import sft_trainer
    from qatkit.data import load_splits, training_examples
    from qatkit.models.loading import load_model_and_tokenizer

    recipe = tiny_recipe(tiny_model_dir, *no_task(text_file), "model.max_seq_length=32", "train.packing=true")
    examples = training_examples(load_splits(recipe.data))
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    trainer = sft_trainer(SFTTrainer, recipe, model, tokenizer, examples, tmp_path / "ckpt", True, True)
    assert trainer.args.packing  # TRL packs
    packed = [row["input_ids"] for row in trainer.train_dataset]
    document_tokens = sum(len(tokenizer(x["text"]).input_ids) + 1 for x in examples)  # + its EOS
    assert sum(map(len, packed)) == document_tokens
    assert sum(row.count(tokenizer.eos_token_id) for row in packed) == len(examples)
    assert sorted(map(len, packed))[1:] == [32] * (len(packed) - 1)  # only the remainder is shorter
    batch = next(iter(trainer.get_train_dataloader()))
    real = batch["attention_mask"].bool()
    assert batch["input_ids"].shape[1] == 32 and (~real).any(dim=1).sum() <= 1  # padding: the remainder at most
    assert (batch["labels"][real] != -100).all()

    out = tmp_path / "run"
    run_recipe(recipe, out, only=["finetune"])
    assert json.loads((out / "finetune" / "train_summary.json").read_text())["steps"] == 2


def test_packing_for_a_model_that_needs_bos_starts_every_sequence_with_it(tiny_model_dir, tmp_path, text_file):
    """train.packing with a tokenizer that starts every text with BOS (Gemma): TRL's wrapped packing would start
    most sequences inside a document without one; qatkit packs instead, BOS first in every sequence, none doubled,
    every document token and its EOS kept, and every token trained on."""
    from trl import SFTTrainer

    from qatkit.backends.trainer import sft_trainer
    from qatkit.data import load_splits, training_examples
    from qatkit.models.loading import load_model_and_tokenizer

    recipe = tiny_recipe(tiny_model_dir, *no_task(text_file), "model.max_seq_length=32", "train.packing=true")
    examples = training_examples(load_splits(recipe.data))
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    tokenizer = with_leading_bos(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    trainer = sft_trainer(SFTTrainer, recipe, model, tokenizer, examples, tmp_path / "ckpt", True, True)
    assert not trainer.args.packing  # packed by qatkit, not again by TRL
    rows = [row["input_ids"] for row in trainer.train_dataset]
    assert all(row[0] == bos and bos not in row[1:] for row in rows)
    assert sorted(map(len, rows))[1:] == [32] * (len(rows) - 1)
    body = sorted(t for row in rows for t in row[1:])
    assert body == sorted(t for x in examples for t in [*tokenizer(x["text"]).input_ids[1:], eos])
    batch = next(iter(trainer.get_train_dataloader()))
    real = batch["attention_mask"].bool()
    assert (batch["input_ids"][:, 0] == bos).all() and (batch["labels"][real] != -100).all()


def test_running_text_cannot_be_mixed_with_task_data(tiny_model_dir, text_file):
    from qatkit.core.errors import RecipeError
    from qatkit.data import load_splits

    recipe = tiny_recipe(tiny_model_dir, f"data.mix=[{{path: {text_file}, format: text, text_field: body}}]")
    with pytest.raises(RecipeError, match="cannot be mixed"):
        load_splits(recipe.data)


@pytest.mark.parametrize(
    "lora", [["qat.lora=merged", "qat.learn_scales=true"], ["qat.lora=merged"], ["qat.lora=unmerged"]]
)
def test_the_task_and_general_forwards_share_one_fake_quantized_weight(
    tiny_model_dir, tmp_path, text_file, monkeypatch, lora
):
    """A step with a general batch runs the student twice on the same weights: each weight is fake-quantized once
    (the backward too), and the loss and every gradient are the ones of two separate fake quantizations."""
    import contextlib

    from qatkit.backends import trainer as trainer_module
    from qatkit.backends.general_text import general_batches
    from qatkit.quant.patches import each_fake_quantizer

    recipe = tiny_recipe(
        tiny_model_dir,
        *lora,
        "distill.teacher=base",
        "distill.weight=0.5",
        f"distill.general.path={text_file}",
        "distill.general.field=body",
        "distill.general.max_tokens=64",
    )

    streams = []

    def stream(teacher, tokenizer):
        streams.append(general_batches(recipe.distill.general, teacher, tokenizer, recipe.train.batch_size, 7, {}))
        return streams[-1]

    trainer, model, _, inputs = _trainer(recipe, tmp_path, stream)
    batch = streams[0].next()
    monkeypatch.setattr(streams[0], "next", lambda device=None: batch)  # the same general batch in both losses
    torch.manual_seed(0)
    with torch.no_grad():  # a LoRA update, so W + s·BA differs from W
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    calls = {}
    for fqn, kind, fq in each_fake_quantizer(model):
        if kind == "weight":

            def counted(w, _compute=fq.forward, _fqn=fqn):
                calls[_fqn] = calls.get(_fqn, 0) + 1
                return _compute(w)

            fq.forward = counted
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss_and_grads():
        calls.clear()
        model.zero_grad()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trained if p.grad is not None}, dict(calls)

    loss, grads, once = loss_and_grads()
    monkeypatch.setattr(trainer_module, "weight_fake_quant_once", lambda model: contextlib.nullcontext())
    want_loss, want_grads, twice = loss_and_grads()

    assert set(once) == set(twice) and len(once) > 0
    assert all(n == 1 for n in once.values()) and all(n == 2 for n in twice.values())
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], msg=name)


def test_awq_calibrates_on_the_general_text_when_asked(tiny_model_dir, tmp_path, text_file):
    """qat.awq.calibration: general: the calibration batch is distill.general's first sequences as training reads
    them (packed here), cut to max_tokens, not the task examples; the search then picks other scales."""
    from safetensors.torch import load_file

    from qatkit.backends.general_text import general_sequences
    from qatkit.backends.hf import GeneralText, _calibration_batch
    from qatkit.data import load_splits, training_examples
    from qatkit.models.loading import load_model_and_tokenizer

    general = [
        "distill.teacher=base",
        f"distill.general.path={text_file}",
        "distill.general.field=body",
        "distill.general.max_tokens=24",
        "distill.general.packing=true",
    ]
    awq = ["qat.learn_scales=true", "qat.awq.samples=3", "qat.awq.max_tokens=16", *general]
    on_text = tiny_recipe(tiny_model_dir, *awq, "qat.awq.calibration=general")
    on_task = tiny_recipe(tiny_model_dir, *awq)
    tokenizer = load_model_and_tokenizer(on_text.model)[1]
    examples = training_examples(load_splits(on_text.data), on_text.data.answer_style)

    batch = _calibration_batch(
        on_text, on_text.qat.awq, examples, tokenizer, general=GeneralText(on_text, None, tokenizer)
    )
    packed = general_sequences(on_text.distill.general, None, tokenizer, on_text.train.seed, {})
    assert len(packed[0]) == 24  # packed to distill.general.max_tokens, then cut to qat.awq.max_tokens
    assert batch["input_ids"].tolist() == [s[:16] for s in packed[:3]]
    assert batch["attention_mask"].all()
    task_batch = _calibration_batch(on_task, on_task.qat.awq, examples, tokenizer)
    chat = tokenizer.apply_chat_template(examples[0]["prompt"] + examples[0]["completion"], tokenize=False)
    assert task_batch["input_ids"][0, :16].tolist() == tokenizer(chat).input_ids[:16]  # the default: the task's

    scales = {}
    for name, recipe in (("text", on_text), ("task", on_task)):
        run_recipe(recipe, tmp_path / name, only=["finetune"])
        scales[name] = load_file(str(tmp_path / name / "finetune" / "adapter" / "awq_scales.safetensors"))
    assert any(not torch.equal(scales["text"][k], scales["task"][k]) for k in scales["text"])


def test_awq_calibrates_on_the_teachers_own_samples_drawn_once(tiny_model_dir, tmp_path, monkeypatch):
    """qat.awq.calibration: general with distill.general.path: teacher (data-free): the teacher samples before the
    search, which calibrates on the first samples as training reads them; training reuses them (drawn once), and
    drawing them leaves the global RNG as it was: a run that finds them cached trains the same adapter. The run keeps
    them, so a resumed one with an empty cache (a fresh machine) reads them instead of sampling again."""
    from safetensors.torch import load_file

    from qatkit.backends import general_text
    from qatkit.backends.hf import GeneralText
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.quant import awq

    general = ["distill.teacher=base", "distill.general.path=teacher", "distill.general.docs=5"]
    awq_start = ["qat.learn_scales=true", "qat.awq.samples=3", "qat.awq.max_tokens=16", "qat.awq.calibration=general"]
    recipe = tiny_recipe(tiny_model_dir, *general, "distill.general.max_tokens=20", *awq_start)
    draws, calibrated_on = [], []
    sample, search = general_text._sample, awq.awq_
    monkeypatch.setattr(general_text, "_sample", lambda *a, **k: draws.append(1) or sample(*a, **k))
    monkeypatch.setattr(
        awq, "awq_", lambda model, ids, mask, *a: calibrated_on.append((ids, mask)) or search(model, ids, mask, *a)
    )

    for name in ("drawn", "cached"):
        run_recipe(recipe, tmp_path / name, only=["finetune"])
    assert len(draws) == 1 and len(calibrated_on) == 2

    tokenizer = load_model_and_tokenizer(recipe.model)[1]
    general = GeneralText(recipe, None, tokenizer)
    samples = general_text.teacher_samples(recipe.distill.general, None, tokenizer, recipe.train.seed, general.identity)
    ids, mask = calibrated_on[0]
    assert ids.shape[0] == 3 and all(len(s) > 1 for s in samples[:3])
    for row, row_mask, s in zip(ids.tolist(), mask.tolist(), samples[:3], strict=True):
        assert row[: sum(row_mask)] == s[:16]
    assert all(torch.equal(a, b) for a, b in zip(*calibrated_on, strict=True))
    adapters = [
        load_file(str(tmp_path / name / "finetune" / "adapter" / "adapter_model.safetensors"))
        for name in ("drawn", "cached")
    ]
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[0][key], adapters[1][key], rtol=0, atol=0, msg=key)

    kept = tmp_path / "drawn" / "finetune" / "teacher_samples"
    assert len(list(kept.glob("*.json"))) == 1
    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(general_text, "_sample", lambda *a, **k: pytest.fail("sampled again instead of the run's copy"))
    assert GeneralText(recipe, None, tokenizer, kept=kept).sequences(recipe.train.seed) == samples
