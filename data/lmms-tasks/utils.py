"""doc_to_visual / doc_to_text / process_results of the toy_vqa task (toy_vqa.yaml)."""

from pathlib import Path

from PIL import Image

TOY_VQA = Path(__file__).resolve().parent.parent / "toy-vqa"


def toy_doc_to_visual(doc):
    with Image.open(TOY_VQA / doc["image"]) as im:
        return [im.convert("RGB")]


def toy_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["text"]


def toy_process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == str(doc["answer"]).strip().lower())}
