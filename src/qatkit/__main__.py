from qatkit.cli import main

main()
