from gnsrepro.cli import main

main()
