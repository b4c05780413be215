"""`python -m dreambooth_singlora.multi`: the many-subject renderer's earlier name (`dreambooth-singlora
generate-many`, in generate.py). The adapter bank itself is in bank.py."""

from .generate import main_many as main

if __name__ == "__main__":
    main()
