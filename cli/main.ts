#!/usr/bin/env node
// skiff's command line: each command lives in its own file and loads its library code lazily,
// so start-up costs only what the chosen command needs.
import { Builtins, Cli } from 'clipanion';
import { BootCommand } from './boot.js';
import { BuildCommand } from './build.js';
import { InspectCommand } from './inspect.js';
import { KernelBuildCommand } from './kernel/build.js';
import { KernelInfoCommand } from './kernel/info.js';

const cli = new Cli({ binaryLabel: 'skiff', binaryName: 'skiff', binaryVersion: '0.1.0', enableCapture: false });
cli.register(Builtins.HelpCommand);
cli.register(Builtins.VersionCommand);
cli.register(BootCommand);
cli.register(BuildCommand);
cli.register(InspectCommand);
cli.register(KernelBuildCommand);
cli.register(KernelInfoCommand);
cli.runExit(process.argv.slice(2));
