from lmscope.cli import main

raise SystemExit(main())
