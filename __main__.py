from pyllm.cli.main import main

raise SystemExit(main())
