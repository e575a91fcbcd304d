//! A module's float parameters as one flat list, in the order Burn visits them, and back.
//!
//! The optimiser moments, accumulated gradients and EMA weights are kept as such lists: the
//! visiting order depends only on the module's type, so index `i` names the same parameter in
//! the model, in its inner (non-autodiff) module and in a module rebuilt from a file, where a
//! `ParamId` would not.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::error::{Result, TrainError};

/// Every float parameter of `module`, flattened to one dimension, in visiting order.
pub fn flat_params<B: Backend, M: Module<B>>(module: &M) -> Vec<Tensor<B, 1>> {
    struct Collect<B: Backend>(Vec<Tensor<B, 1>>);
    impl<B: Backend> ModuleVisitor<B> for Collect<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            let n = value.shape().num_elements();
            self.0.push(value.reshape([n]));
        }
    }
    let mut collect = Collect(Vec::new());
    module.visit(&mut collect);
    collect.0
}

/// `module` with its float parameters replaced by `values` (flat, in visiting order, each of
/// the parameter's element count), keeping every `ParamId`. Fails when the count or a size
/// differs, naming the first parameter that does not fit.
pub fn with_flat_params<B: Backend, M: Module<B>>(
    module: M,
    values: Vec<Tensor<B, 1>>,
) -> Result<M> {
    struct Replace<B: Backend> {
        values: std::vec::IntoIter<Tensor<B, 1>>,
        index: usize,
        problem: Option<String>,
    }
    impl<B: Backend> ModuleMapper<B> for Replace<B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let index = self.index;
            self.index += 1;
            let shape = tensor.shape();
            let value = match self.values.next() {
                Some(v) if v.shape().num_elements() == shape.num_elements() => {
                    v.reshape(tensor.dims())
                }
                Some(v) => {
                    self.problem.get_or_insert(format!(
                        "parameter {index} has {} values, the state has {}",
                        shape.num_elements(),
                        v.shape().num_elements()
                    ));
                    tensor
                }
                None => {
                    self.problem
                        .get_or_insert(format!("the state ends before parameter {index}"));
                    tensor
                }
            };
            Param::from_mapped_value(id, value, mapper)
        }
    }
    let count = values.len();
    let mut replace = Replace {
        values: values.into_iter(),
        index: 0,
        problem: None,
    };
    let module = module.map(&mut replace);
    if let Some(problem) = replace.problem {
        return Err(TrainError::State(problem));
    }
    if replace.index != count {
        return Err(TrainError::State(format!(
            "the model has {} parameters, the state {count}",
            replace.index
        )));
    }
    Ok(module)
}
