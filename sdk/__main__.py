from rayfarm.cli import main

raise SystemExit(main())
