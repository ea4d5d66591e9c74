"""Remote interpretability: evaluator code runs sandboxed against private weights; only results leave."""
