from codecomplete.cli import main

raise SystemExit(main())
