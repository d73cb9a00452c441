from fluid_cli.cli import main

main()
