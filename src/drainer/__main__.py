from drainer.cli import main

raise SystemExit(main())
