"""`python -m dreambooth_singlora.train_multi --subjects ...`: the trainer's earlier name for many subjects.

One trainer serves one subject or many: this is `python -m dreambooth_singlora.train_dreambooth`.
"""

from .train_dreambooth import main

if __name__ == "__main__":
    main()
