from .cli import main

if __name__ == "__main__":  # not in a batch decode process, which imports this as __mp_main__
    main()
