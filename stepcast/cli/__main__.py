from stepcast.cli.main import main

raise SystemExit(main())
