"""Write notebooks/tutorial.ipynb from the cells below (the notebook is generated: edit here).

    .venv/bin/python notebooks/build_tutorial.py            # write the notebook
    .venv/bin/python notebooks/build_tutorial.py --execute  # also run it and render docs/tutorial.md
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CELLS: list[tuple[str, str]] = [
    ("md", """# emocircuits tutorial: emotion circuits in SmolLM2, step by step

This notebook uses the library's functions one at a time on **SmolLM2-135M-Instruct** (embedded,
offline, CPU), at small sizes so that it runs in a few minutes. Each step is one function call
that takes a model and data and returns a small typed result:

1. load the model and build SEV prompts (a neutral scenario + a positive/neutral/negative event);
2. `collect` last-token activations;
3. emotion directions, their decodability, and the **keyword control**;
4. steering with a direction: base vs steered text, with perplexity;
5. neuron and head scores;
6. `assemble_circuit` and `modulate`;
7. the method comparison with 95 % intervals over scenarios;
8. circuitsvis views of the top components.

The whole protocol, with settings chosen on validation, is `emocircuits run --preset quick`
(see the quickstart); this notebook shows what that run is made of."""),
    ("code", """import os
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice without ipywidgets
import torch  # noqa: E402

import emocircuits as ec  # noqa: E402
from emocircuits import circuits as C  # noqa: E402
from emocircuits import components as K  # noqa: E402
from emocircuits import directions as D  # noqa: E402
from emocircuits.data import emotion_prompts, load_sev, neutral_prompts  # noqa: E402
from emocircuits.steering import paper_layers, steer  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning, module="emocircuits")
MODEL = os.environ.get("EMOCIRCUITS_TUTORIAL_MODEL", "smollm2-135m-instruct")
EMOTIONS = list(ec.EKMAN6)
model = ec.load_model(MODEL)
print(MODEL, "layers:", model.cfg.n_layers, "heads:", model.cfg.n_heads, "d_model:", model.cfg.d_model)"""),
    ("md", """## 1. SEV prompts

A record is a neutral scenario with three events; `emotion_prompts` renders it with the paper's
instruction "Always reply in {emotion}." in the model's chat template, one prompt per
(record, event, emotion)."""),
    ("code", """train = load_sev("builtin:train")[:6]
prompts = emotion_prompts(model, train, EMOTIONS)
print(len(prompts), "prompts; the first one:")
print(prompts[0].text)"""),
    ("md", """## 2. Collect activations

`collect` runs the prompts in batches and keeps only the sites and positions asked for (here the
last prompt token), not a full `run_with_cache`."""),
    ("code", """acts = ec.collect(model, prompts, ("resid_mid", "resid_post", "mlp_post", "z"), position="last",
                  progress=False)
{site: tuple(acts[site].shape) for site in ("resid_mid", "resid_post", "mlp_post", "z")}"""),
    ("md", """## 3. Emotion directions and the keyword control

Context-agnostic directions: per (scenario, event) group, subtract the mean over emotions,
then average per emotion and normalise. Held-out nearest-centroid decoding says how well the
emotion can be read per layer. But the prompts differ only by the emotion **word**, so a
decoder may read the word itself: the keyword control swaps the emotion words for colour words
and decodes those the same way. If colours decode as well, decodability alone is no evidence of
emotion."""),
    ("code", """dirs = D.context_agnostic(acts, prompts, EMOTIONS, sites=["resid_mid", "resid_post"])
dec = D.nearest_centroid_accuracy(acts, prompts, EMOTIONS, "resid_post", n_folds=3)
kw = D.keyword_control(model, train, EMOTIONS, ("red", "blue", "green", "yellow", "purple", "orange"),
                       site="resid_post", n_folds=3, emotion_acts=acts, progress=False)
mid = model.cfg.n_layers // 2
print(f"layer {mid}: emotion words {dec.centered[mid]:.2f}, colour words {kw.control.centered[mid]:.2f}, "
      f"chance {dec.chance:.2f}")"""),
    ("code", """from IPython.display import Image, display

from emocircuits.viz import figures as F

png = F.probe_accuracy({"emotion words": kw.emotion.centered, "colour words (control)": kw.control.centered},
                       "tutorial_keyword_control.png", layers=kw.emotion.layers, chance=kw.emotion.chance,
                       title="held-out decoding per layer: emotion words vs colour words")
display(Image(filename=str(png)))"""),
    ("md", """## 4. Steering: base vs steered text

`steer` is a context manager: inside it every forward (and `generate`) adds α · rms · v at the
chosen layers; the hooks are removed on exit, also on an exception. The paper's α = 8 turns
SmolLM2's text into word salad; the strength here is a small one of the kind the steering
study picks on validation (see docs/stages/steering.md). Perplexity under the unsteered model
says whether the text stayed fluent."""),
    ("code", """from emocircuits.evaluate import fluency

test = load_sev("builtin:test")[:2]
neutral = neutral_prompts(model, test)
gen = ec.GenerationConfig(max_new_tokens=30, min_new_tokens=10, repetition_penalty=1.1, no_repeat_ngram_size=3)
ALPHA = 1.0
base = ec.generate(model, neutral[:2], gen, progress=False).texts
with steer(model, dirs, paper_layers(model), strength=ALPHA, emotion="happiness"):
    steered = ec.generate(model, neutral[:2], gen, progress=False).texts
ppl_base = fluency(model, neutral[:2], base).perplexity
ppl_steer = fluency(model, neutral[:2], steered).perplexity
for b, s, pb, ps in zip(base, steered, ppl_base, ppl_steer, strict=True):
    print(f"base     (ppl {pb:5.1f}): {b}")
    print(f"steered  (ppl {ps:5.1f}): {s}\\n")"""),
    ("md", """## 5. Neuron and head scores

Neuron contribution C = activation × ⟨W_out row, v⟩ (the neuron's write onto the emotion
direction, averaged over the emotion's prompts); head importance = how much the layer's
emotion score drops when the head is zeroed, computed exactly in closed form from one forward."""),
    ("code", """neurons = K.neuron_contributions(model, prompts, None, dirs, progress=False)
heads = K.head_ablation_importance_closed_form(model, prompts, None, dirs, progress=False)
e = EMOTIONS.index("anger")
top = torch.topk(heads.mean[e].flatten(), 5).indices
print("top heads for anger (layer, head):", [(int(i) // model.cfg.n_heads, int(i) % model.cfg.n_heads) for i in top])
topn = torch.topk(neurons.C_mean[e].flatten(), 5).indices
print("top neurons for anger (layer, neuron):", [(int(i) // model.cfg.d_mlp, int(i) % model.cfg.d_mlp) for i in topn])"""),
    ("md", """## 6. Assemble a circuit and modulate it

Sublayer influence I(L, p) (how much steering one sublayer moves the final emotion score)
allocates a budget of units per sublayer; the top-scored neurons and heads fill it. Modulation
adds λ·Δμ (the emotion's mean activation difference) to those units while generating. A small
budget (3 per sublayer) keeps the circuit sparse on a small model."""),
    ("code", """dv = C.difference_vectors_from_acts(acts["mlp_post"], acts["z"], prompts, EMOTIONS)
sigma = C.sigma_from_acts(acts["resid_post"], acts["resid_mid"])
infl = C.sublayer_influence(model, neutral_prompts(model, train[:2]), dirs.vectors["resid_mid"],
                            dirs.vectors["resid_post"], sigma, alphas=(0.5,), emotions=EMOTIONS, progress=False)
circuits = {em: C.assemble_circuit(em, infl.influence[i], neurons.C_mean[i], heads.mean[i], dv.mlp[i], dv.z[i],
                                   budget_per_sublayer=3) for i, em in enumerate(EMOTIONS)}
c = circuits["anger"]
print(f"anger circuit: {c.n_neurons} neurons, {c.n_heads} heads over {model.cfg.n_layers} layers")
with C.modulate(model, c, 2.0):
    print("modulated (λ=2):", ec.generate(model, neutral[:1], gen, progress=False).texts[0])"""),
    ("md", """## 7. The method comparison, with intervals

`evaluate_intervention` generates for every (prompt, target emotion), judges each text with the
offline judge (which abstains on junk) and measures perplexity and repetition.
`compare_methods` gives **fluent accuracy** (judged the target *and* fluent) with 95 %
bootstrap intervals that resample scenarios, and paired verdicts. Two scenarios are far too few
for a verdict (the notebook says so in the verdict lines); the `quick`/`full` presets and
`experiments/06_circuits.toml` use more."""),
    ("code", """from emocircuits.evaluate import compare_methods, evaluate_intervention
from emocircuits.judges import default_judge

judge = default_judge(EMOTIONS)
gen_short = ec.GenerationConfig(max_new_tokens=20, min_new_tokens=8, repetition_penalty=1.1, no_repeat_ngram_size=3,
                                batch_size=18)


def run(make, name):
    return evaluate_intervention(model, neutral, EMOTIONS, make, judge, gen_short, method=name)


evals = {
    "none": run(lambda em: None, "none"),
    "steering": run(lambda em: steer(model, dirs, paper_layers(model), strength=ALPHA, emotion=em), "steering"),
    "circuit": run(lambda em: C.modulate(model, circuits[em], 2.0), "circuit"),
    "random circuit 0": run(lambda em: C.modulate(model, C.random_circuit(circuits[em], dv.mlp[EMOTIONS.index(em)],
                                                                          dv.z[EMOTIONS.index(em)], seed=0), 2.0),
                            "random circuit 0"),
}
cmp = compare_methods(evals)
cmp.to_dataframe()[["method", "fluent_accuracy", "fluent_low", "fluent_high", "accuracy", "perplexity_median", "n"]]"""),
    ("code", """for v in cmp.verdicts:
    print(v)
png = F.fluent_comparison(cmp.table, "tutorial_methods.png", title="fluent accuracy (2 test scenarios)")
display(Image(filename=str(png)))"""),
    ("md", """## 8. Looking at the components (circuitsvis, offline)

The attention of the top heads and the activations of the top neurons on one prompt; the views
are inlined HTML with a bundled copy of circuitsvis (no network)."""),
    ("code", """from emocircuits.viz import attention_view, neuron_view

text = "I waited an hour for the bus and it never came."
top_heads = [(int(i) // model.cfg.n_heads, int(i) % model.cfg.n_heads) for i in top[:2]]
attention_view(model, text, heads=top_heads)"""),
    ("code", """neuron_view(model, text, neurons=[(int(i) // model.cfg.d_mlp, int(i) % model.cfg.d_mlp) for i in topn[:2]])"""),
    ("md", """## Next

* the whole protocol, settings chosen on validation: `emocircuits run --preset quick --out runs/quick`,
  then open `runs/quick/report.html` (it leads with the method comparison);
* `emocircuits tables runs/quick` prints every table of a run as Markdown;
* the other notebook, `byo_model.ipynb`, runs the same steps on any Hugging Face causal LM folder."""),
]


BYO_CELLS: list[tuple[str, str]] = [
    ("md", """# Bring your own model

Any Hugging Face causal LM that TransformerLens' `TransformerBridge` supports (Llama, Gemma,
Qwen, Mistral, GPT-2 …) works: pass a local folder (``config.json`` + weights), a `.gguf` file,
or a hub name you have cached. Here: a folder, set by `EMOCIRCUITS_MODEL_DIR` (default: a
random tiny Llama written to a temporary folder, so the notebook runs anywhere)."""),
    ("code", """import os
import tempfile

import emocircuits as ec
from emocircuits import directions as D
from emocircuits.data import emotion_prompts, load_sev, neutral_prompts
from emocircuits.steering import paper_layers, steer

folder = os.environ.get("EMOCIRCUITS_MODEL_DIR")
if folder is None:  # a stand-in: the tiny random Llama saved as an ordinary HF folder
    tiny = ec.load_model("tiny-llama")
    folder = tempfile.mkdtemp(prefix="byo-")
    from transformers import LlamaForCausalLM

    from emocircuits.models import hf_model_of

    LlamaForCausalLM(hf_model_of(tiny).config).save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
model = ec.load_model(folder)
print(model.cfg.n_layers, "layers; chat template:", bool(getattr(model.tokenizer, "chat_template", None)))"""),
    ("md", """A base model (no chat template) gets plain continuation prompts; a chat model the chat
template. Everything else is the same calls as in the tutorial."""),
    ("code", """EMOTIONS = list(ec.EKMAN6)
train = load_sev("builtin:train")[:3]
prompts = emotion_prompts(model, train, EMOTIONS)
acts = ec.collect(model, prompts, ("resid_mid", "resid_post"), position="last", progress=False)
dirs = D.context_agnostic(acts, prompts, EMOTIONS)
neutral = neutral_prompts(model, load_sev("builtin:test")[:1])
with steer(model, dirs, paper_layers(model), strength=1.0, emotion="fear"):
    print(ec.generate(model, neutral[:1], ec.GenerationConfig(max_new_tokens=12), progress=False).texts)"""),
    ("md", """The full protocol on your model: `emocircuits run --preset quick --model /path/to/folder --out runs/mine`
(`--dry-run` first: it checks every setting, including layer numbers against the model's depth,
and estimates the time)."""),
]


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 1200) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def to_markdown(nb: nbformat.NotebookNode, img_dir: Path, img_prefix: str) -> str:
    """An executed notebook as Markdown: code fenced, text outputs fenced, PNGs written beside,
    HTML views left out (they need their script; the report shows them)."""
    img_dir.mkdir(parents=True, exist_ok=True)
    parts, k = [], 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source)
            continue
        parts.append("```python\n" + cell.source + "\n```")
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if out.get("output_type") == "stream":
                if out.get("name") == "stderr" or not out["text"].strip():
                    continue  # progress bars and library warnings: not part of the lesson
                parts.append("```text\n" + out["text"].rstrip() + "\n```")
            elif "image/png" in data:
                k += 1
                name = f"{img_prefix}_{k}.png"
                (img_dir / name).write_bytes(base64.b64decode(data["image/png"]))
                parts.append(f"![output {k}]({img_dir.name}/{name})")
            elif "text/html" in data and "<table" in data["text/html"] and "cv-view" not in data["text/html"]:
                parts.append(data["text/html"])
            elif "text/plain" in data and "text/html" not in data:
                parts.append("```text\n" + data["text/plain"].rstrip() + "\n```")
            elif "text/html" in data:
                parts.append("*(an interactive circuitsvis view: run the notebook, or see a run's report.html)*")
    return "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--execute", action="store_true", help="run the tutorial and render docs/tutorial.md")
    args = ap.parse_args()
    for name, cells in (("tutorial.ipynb", CELLS), ("byo_model.ipynb", BYO_CELLS)):
        nbformat.write(build(cells), HERE / name)
        print("wrote", HERE / name)
    if args.execute:
        import tempfile

        nb = execute(build(CELLS), Path(tempfile.mkdtemp(prefix="tutorial-")))
        head = ("# Tutorial notebook (executed)\n\n`notebooks/tutorial.ipynb`, executed on SmolLM2-135M-Instruct "
                "(CPU) by `.venv/bin/python notebooks/build_tutorial.py --execute`; the CI runs the same "
                "notebook (tests/test_notebooks.py).\n\n")
        md = to_markdown(nb, ROOT / "docs" / "tutorial_files", "tutorial")
        (ROOT / "docs" / "tutorial.md").write_text(head + md.split("\n", 1)[1], encoding="utf-8")
        print("wrote", ROOT / "docs" / "tutorial.md")


if __name__ == "__main__":
    main()
