"""python -m experiments.bench: GPart vs LoRA vs full fine-tuning (see bench/compare.py)."""
from .compare import main

if __name__ == "__main__":
    main()
