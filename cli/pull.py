"""`pyllm pull [NAME]`: download a known model into the cache (~/.cache/pyllm/models,
or $PYLLM_HOME/models) and print its path."""

import argparse


def main(argv=None) -> int:
    from pyllm.runtime import hub

    p = argparse.ArgumentParser(prog="pyllm pull", description="Download a known model into the model cache.")
    p.add_argument("name", nargs="?", default=hub.DEFAULT_CHAT_MODEL,
                   help=f"model to fetch (default: {hub.DEFAULT_CHAT_MODEL}); known: {', '.join(hub.MODELS)}")
    p.add_argument("--list", action="store_true", help="list the known models and where they would go")
    p.add_argument("--force", action="store_true", help="download again even if the file is present")
    args = p.parse_args(argv)

    if args.list:
        for m in hub.MODELS.values():
            state = "present" if hub.is_present(m.name) else "not downloaded"
            print(f"{m.name:<10} {m.filename}  {m.size / 1e6:.0f} MB  {m.license}  [{state}]  {m.description}")
        print(f"cache: {hub.models_dir()}")
        return 0
    path = hub.pull(args.name, force=args.force)
    print(path)
    return 0
