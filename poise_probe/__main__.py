from poise_probe.cli import main

raise SystemExit(main())
